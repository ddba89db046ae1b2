//! The agent: keeps one session with the station over outbound HTTP and
//! carries local connections through it.
//!
//! ```text
//! forward listener ─accept─▶ wait for session ─▶ open stream(target) ─▶ pump
//! session loop: hello ─▶ Tunnel ─▶ lanes (stream: up + down | poll: poll + push) + timers
//!                 ▲ backoff with jitter ◀── session ends (idle, 404, peer close)
//! ```
//!
//! Every carrier connection is opened by the agent: the device's firewall
//! only lets traffic out. Through a forward proxy, requests use absolute
//! form (`POST http://station/...`); CONNECT is never used.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_listener::Event as Notify;
use futures_lite::future;
use smol::net::{TcpListener, TcpStream};

use crate::carrier::conn::HttpConn;
use crate::carrier::http::{self, BodyKind, HttpError, ResponseHead, CHUNK_END};
use crate::carrier::{self, Verb, DOWN_BODY_MAX, POLL_BODY_MAX, POLL_WAIT, STREAM_CHUNK};
use crate::config::{AgentConfig, CarrierKind, ForwardSource, ProxyUrl, Service, StationUrl};
use crate::core::session::{Lane, Limits};
use crate::core::streams::Side;
use crate::crypto::{self, RecordReader, SessionId, MAX_HANDSHAKE, MAX_RECORD};
use crate::keys::{PrivateKey, PublicKey};
use crate::task::Scope;
use crate::tunnel::{Incoming, LaneEnd, Tunnel};

/// Time to open a TCP connection to the station or proxy.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Time for a reply to a request that the station answers at once.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Time a local connection waits for a session before it is closed.
const SESSION_WAIT: Duration = Duration::from_secs(10);

/// Reconnect delays: doubling from the first to the last, each scaled by a
/// random factor in [0.5, 1.5) so a fleet does not return in step.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_LAST: Duration = Duration::from_secs(30);

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("forward to {target}: cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, target: String, source: std::io::Error },
    #[error("forward to {target}: serial lines are not supported yet ({path})")]
    SerialUnsupported { target: String, path: String },
}

/// Why one carrier request failed.
#[derive(Debug, thiserror::Error)]
enum CarrierError {
    #[error("cannot connect to {what} {addr}: {source}")]
    Connect { what: &'static str, addr: String, source: std::io::Error },
    #[error("connecting to {what} {addr} timed out")]
    ConnectTimeout { what: &'static str, addr: String },
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("proxy {0} requires authentication (407): set user:pass in `proxy`")]
    ProxyAuth(String),
    #[error("the station refused our key {0} (403): add it to the station's [[devices]]")]
    KeyRefused(String),
    #[error("{who} answered {status} {reason}")]
    Status { who: String, status: u16, reason: String },
    #[error("the station does not know this session (it restarted or timed it out)")]
    SessionGone,
    #[error("the station's handshake reply did not verify: {0}")]
    Handshake(crypto::CryptoError),
    #[error("the station sent a body that is not sealed packets")]
    BadBody,
}

/// Exponential backoff with jitter.
struct Backoff {
    next: Duration,
    rng: u64,
}

impl Backoff {
    fn new() -> Self {
        let mut seed = [0u8; 8];
        // Without OS randomness the jitter is merely less random.
        let _ = getrandom::fill(&mut seed);
        Backoff { next: BACKOFF_FIRST, rng: u64::from_le_bytes(seed) | 1 }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }

    fn delay(&mut self) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let factor = 0.5 + (self.rng % 1000) as f64 / 1000.0;
        let delay = self.next.mul_f64(factor);
        self.next = (self.next * 2).min(BACKOFF_LAST);
        delay
    }
}

/// How to reach the station: directly or through a forward proxy.
struct Client {
    station: StationUrl,
    proxy: Option<ProxyUrl>,
    proxy_auth: Option<String>,
}

impl Client {
    fn describe(&self) -> String {
        match &self.proxy {
            Some(p) => format!("proxy {}:{}", p.host, p.port),
            None => format!("station {}", self.station.authority()),
        }
    }

    async fn connect(&self) -> Result<HttpConn<TcpStream>, CarrierError> {
        let (what, host, port) = match &self.proxy {
            Some(p) => ("proxy", p.host.as_str(), p.port),
            None => ("station", self.station.host.as_str(), self.station.port),
        };
        let addr = format!("{host}:{port}");
        let connect = async {
            TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
                .await
                .map_err(|source| CarrierError::Connect { what, addr: addr.clone(), source })
        };
        let timeout = async {
            smol::Timer::after(CONNECT_TIMEOUT).await;
            Err(CarrierError::ConnectTimeout { what, addr: addr.clone() })
        };
        let socket = future::or(connect, timeout).await?;
        let _ = socket.set_nodelay(true);
        Ok(HttpConn::new(socket))
    }

    /// Appends the head of a carrier request.
    fn head(&self, out: &mut Vec<u8>, session: &SessionId, verb: Verb, body: BodyKind) {
        let path = carrier::path(&self.station.path_prefix, session, verb);
        let authority = self.station.authority();
        let target = match self.proxy {
            Some(_) => format!("http://{authority}{path}"),
            None => path,
        };
        let mut headers = vec![("Content-Type", "application/octet-stream")];
        if let Some(auth) = &self.proxy_auth {
            headers.push(("Proxy-Authorization", auth.as_str()));
        }
        http::write_request_head(out, "POST", &target, &authority, &headers, body);
    }

    /// Turns a non-200 reply into the error a user can act on.
    fn check(&self, head: &ResponseHead) -> Result<(), CarrierError> {
        match head.status {
            200 => Ok(()),
            404 => Err(CarrierError::SessionGone),
            407 => Err(CarrierError::ProxyAuth(self.describe())),
            status => Err(CarrierError::Status {
                who: if self.proxy.is_some() { "the proxy or station" } else { "the station" }
                    .to_owned(),
                status,
                reason: head.reason.clone(),
            }),
        }
    }

    /// Sends one request with a bounded body and reads the whole reply,
    /// on `conn` if it is still open, else on a new connection, which is
    /// kept for the next request when the reply allows.
    async fn exchange(
        &self,
        conn: &mut Option<HttpConn<TcpStream>>,
        session: &SessionId,
        verb: Verb,
        body: &[u8],
        wait: Duration,
        max_reply: u64,
    ) -> Result<Vec<u8>, CarrierError> {
        let mut live = match conn.take() {
            Some(live) => live,
            None => self.connect().await?,
        };
        let mut out = Vec::with_capacity(512 + body.len());
        self.head(&mut out, session, verb, BodyKind::Length(body.len() as u64));
        out.extend_from_slice(body);
        live.write_all(&out).await.map_err(HttpError::Io)?;
        let head =
            deadline(wait, async { live.read_response(false).await.map_err(Into::into) }).await?;
        self.check(&head)?;
        let mut reply = Vec::new();
        let reading = async {
            live.body(head.body, Some(max_reply)).read_to_end(&mut reply).await.map_err(Into::into)
        };
        deadline(REPLY_TIMEOUT, reading).await?;
        if head.keep_alive {
            *conn = Some(live);
        }
        Ok(reply)
    }
}

async fn deadline<T>(
    limit: Duration,
    work: impl std::future::Future<Output = Result<T, CarrierError>>,
) -> Result<T, CarrierError> {
    future::or(work, async {
        smol::Timer::after(limit).await;
        Err(CarrierError::Http(HttpError::Timeout))
    })
    .await
}

struct Shared {
    client: Client,
    key: PrivateKey,
    station_key: PublicKey,
    carrier: CarrierKind,
    services: std::collections::BTreeMap<String, Service>,
    limits: Limits,
    current: Mutex<Option<Arc<Tunnel>>>,
    changed: Notify,
}

impl Shared {
    fn set_current(&self, tunnel: Option<Arc<Tunnel>>) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = tunnel;
        self.changed.notify(usize::MAX);
    }

    /// The live session, waiting up to `limit` for one.
    async fn session(&self, limit: Duration) -> Option<Arc<Tunnel>> {
        let give_up = smol::Timer::after(limit);
        let wait = async {
            loop {
                let listener = self.changed.listen();
                let current = self.current.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(tunnel) = current.filter(|t| t.closed().is_none()) {
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
    forwards: Vec<(TcpListener, String)>,
}

impl Agent {
    pub async fn bind(config: AgentConfig) -> Result<Agent, Error> {
        Self::bind_with(config, Limits::default()).await
    }

    /// As [`Agent::bind`], with session timing chosen by the caller.
    pub async fn bind_with(config: AgentConfig, limits: Limits) -> Result<Agent, Error> {
        let proxy = config.proxy;
        let mut forwards = Vec::new();
        for forward in config.forwards {
            match forward.source {
                ForwardSource::Listen(addr) => {
                    let listener = TcpListener::bind(addr).await.map_err(|source| Error::Bind {
                        addr,
                        target: forward.target.clone(),
                        source,
                    })?;
                    forwards.push((listener, forward.target));
                }
                ForwardSource::Serial(serial) => {
                    return Err(Error::SerialUnsupported {
                        target: forward.target,
                        path: serial.path,
                    })
                }
            }
        }
        let proxy_auth = proxy.as_ref().and_then(ProxyUrl::authorization);
        let shared = Shared {
            client: Client { station: config.station, proxy, proxy_auth },
            key: config.private_key,
            station_key: config.station_public_key,
            carrier: config.carrier,
            services: config.services,
            limits,
            current: Mutex::new(None),
            changed: Notify::new(),
        };
        Ok(Agent { shared: Arc::new(shared), forwards })
    }

    /// Local addresses of the forward listeners, in config order.
    pub fn forward_addrs(&self) -> Vec<SocketAddr> {
        self.forwards
            .iter()
            .map(|(l, _)| l.local_addr().expect("a bound listener has an address"))
            .collect()
    }

    /// Runs until the future is dropped; then every task of the agent ends.
    pub async fn run(self) {
        let scope = Scope::new();
        for (listener, target) in self.forwards {
            let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            log::info!("forwarding {addr} to station target {target:?}");
            scope.spawn(accept_forward(self.shared.clone(), listener, target));
        }
        keep_session(&self.shared).await;
    }
}

async fn accept_forward(shared: Arc<Shared>, listener: TcpListener, target: String) {
    let scope = Scope::new();
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => {
                scope.spawn(carry_local(shared.clone(), socket, peer, target.clone()));
            }
            Err(e) => {
                log::warn!("forward to {target}: accept failed: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn carry_local(shared: Arc<Shared>, socket: TcpStream, peer: SocketAddr, target: String) {
    let _ = socket.set_nodelay(true);
    let Some(tunnel) = shared.session(SESSION_WAIT).await else {
        log::warn!("{peer} -> {target}: no session with the station; closing the connection");
        return;
    };
    match tunnel.open(&target) {
        Ok(id) => {
            log::debug!("{peer} -> {target}: stream {id}");
            tunnel.pump(id, socket).await;
        }
        Err(e) => log::warn!("{peer} -> {target}: {e}; closing the connection"),
    }
}

/// Keeps a session with the station for as long as the agent runs.
async fn keep_session(shared: &Arc<Shared>) {
    let mut backoff = Backoff::new();
    loop {
        match handshake(shared).await {
            Ok((tunnel, incoming, session)) => {
                backoff.reset();
                log::info!(
                    "connected to the station via {} (session {}, carrier {:?})",
                    shared.client.describe(),
                    carrier::short(&session),
                    shared.carrier
                );
                shared.set_current(Some(tunnel.clone()));
                let reason = run_session(shared, &tunnel, session, incoming).await;
                shared.set_current(None);
                log::warn!("session {} ended: {reason}", carrier::short(&session));
            }
            Err(e) => {
                let delay = backoff.delay();
                log::warn!("cannot start a session: {e}; retrying in {:.1} s", delay.as_secs_f32());
                smol::Timer::after(delay).await;
            }
        }
    }
}

async fn handshake(
    shared: &Shared,
) -> Result<(Arc<Tunnel>, smol::channel::Receiver<Incoming>, SessionId), CarrierError> {
    let mut session = [0u8; crypto::SESSION_ID_LEN];
    getrandom::fill(&mut session).map_err(|e| CarrierError::Connect {
        what: "random source",
        addr: String::new(),
        source: e.into(),
    })?;
    let (initiator, msg) = crypto::initiate(&shared.key, &shared.station_key, &session)
        .map_err(CarrierError::Handshake)?;
    let client = &shared.client;
    let mut conn = None;
    let reply = client
        .exchange(&mut conn, &session, Verb::Hello, &msg, REPLY_TIMEOUT, MAX_HANDSHAKE as u64)
        .await
        .map_err(|e| match e {
            CarrierError::Status { status: 403, .. } => {
                CarrierError::KeyRefused(shared.key.public_key().to_base64())
            }
            other => other,
        })?;
    let transport = initiator.finish(&reply).map_err(CarrierError::Handshake)?;
    let (tunnel, incoming) = Tunnel::new(Side::Agent, transport, shared.limits);
    Ok((tunnel, incoming, session))
}

/// Runs the session's lanes, timers and reverse streams until it ends.
async fn run_session(
    shared: &Arc<Shared>,
    tunnel: &Arc<Tunnel>,
    session: SessionId,
    incoming: smol::channel::Receiver<Incoming>,
) -> String {
    let scope = Scope::new();
    match shared.carrier {
        CarrierKind::Poll => {
            scope.spawn(lane_loop(shared.clone(), tunnel.clone(), session, Verb::Poll));
            scope.spawn(lane_loop(shared.clone(), tunnel.clone(), session, Verb::Push));
        }
        // `auto` starts with the stream shape; detecting a buffering path
        // and falling back to poll is the middlebox work still to come.
        CarrierKind::Stream | CarrierKind::Auto => {
            scope.spawn(lane_loop(shared.clone(), tunnel.clone(), session, Verb::Down));
            scope.spawn(lane_loop(shared.clone(), tunnel.clone(), session, Verb::Up));
        }
    }
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
async fn open_service(shared: Arc<Shared>, tunnel: Arc<Tunnel>, stream: Incoming) {
    let Incoming { id, name } = stream;
    let address = match shared.services.get(&name) {
        Some(Service::Tcp(address)) => address.clone(),
        Some(Service::Serial(_)) => {
            log::warn!("station asked for serial service {name:?}: not supported yet");
            tunnel.reset(id, &format!("service {name:?} is a serial line, not supported yet"));
            return;
        }
        None => {
            log::warn!("station asked for unknown service {name:?}; refused");
            tunnel.reset(id, &format!("the device has no service named {name:?}"));
            return;
        }
    };
    match TcpStream::connect(address.as_str()).await {
        Ok(socket) => {
            let _ = socket.set_nodelay(true);
            tunnel.pump(id, socket).await;
        }
        Err(e) => {
            log::warn!("service {name} ({address}): {e}");
            tunnel.reset(id, &format!("service {name}: {e}"));
        }
    }
}

/// Keeps one lane of the carrier going, reconnecting with backoff.
async fn lane_loop(shared: Arc<Shared>, tunnel: Arc<Tunnel>, session: SessionId, verb: Verb) {
    let mut backoff = Backoff::new();
    loop {
        let result = match verb {
            Verb::Down => down_lane(&shared, &tunnel, &session, &mut backoff).await,
            Verb::Up => up_lane(&shared, &tunnel, &session).await,
            Verb::Poll => poll_lane(&shared, &tunnel, &session, &mut backoff).await,
            _ => push_lane(&shared, &tunnel, &session, &mut backoff).await,
        };
        match result {
            Err(CarrierError::SessionGone) => {
                tunnel.end(&CarrierError::SessionGone.to_string());
                return;
            }
            Err(e) => {
                let delay = backoff.delay();
                log::warn!("{verb:?} lane: {e}; reconnecting in {:.1} s", delay.as_secs_f32());
                smol::Timer::after(delay).await;
            }
            Ok(()) => {}
        }
        if tunnel.closed().is_some() {
            return;
        }
    }
}

fn receive(
    tunnel: &Tunnel,
    bytes: &[u8],
    reader: &mut RecordReader,
    scratch: &mut Vec<u8>,
) -> Result<usize, CarrierError> {
    tunnel.receive(bytes, reader, scratch).map_err(|_| CarrierError::BadBody)
}

/// Stream shape, station to agent: one long chunked response.
async fn down_lane(
    shared: &Shared,
    tunnel: &Tunnel,
    session: &SessionId,
    backoff: &mut Backoff,
) -> Result<(), CarrierError> {
    let client = &shared.client;
    let mut conn = client.connect().await?;
    let mut proof = Vec::new();
    tunnel.seal_ack(&mut proof);
    let mut out = Vec::new();
    client.head(&mut out, session, Verb::Down, BodyKind::Length(proof.len() as u64));
    out.extend_from_slice(&proof);
    conn.write_all(&out).await.map_err(HttpError::Io)?;
    let head =
        deadline(REPLY_TIMEOUT, async { conn.read_response(false).await.map_err(Into::into) })
            .await?;
    client.check(&head)?;
    let mut reader = RecordReader::default();
    let mut scratch = Vec::new();
    let mut body = conn.body(head.body, None);
    // The station sends a keepalive at least this often; silence for
    // longer means the connection is dead even if TCP has not noticed.
    let silence = shared.limits.keepalive * 2 + Duration::from_secs(5);
    let mut first = true;
    while let Some(bytes) =
        deadline(silence, async { body.next().await.map_err(Into::into) }).await?
    {
        receive(tunnel, bytes, &mut reader, &mut scratch)?;
        if first {
            first = false;
            backoff.reset();
        }
    }
    Ok(())
}

/// Stream shape, agent to station: one long chunked request.
async fn up_lane(
    shared: &Shared,
    tunnel: &Tunnel,
    session: &SessionId,
) -> Result<(), CarrierError> {
    let client = &shared.client;
    let mut conn = client.connect().await?;
    let mut out = Vec::with_capacity(STREAM_CHUNK + MAX_RECORD + 64);
    client.head(&mut out, session, Verb::Up, BodyKind::Chunked);
    conn.write_all(&out).await.map_err(HttpError::Io)?;
    let lane = tunnel.begin_lane(Lane::Data);
    loop {
        out.clear();
        // Room for a fixed-width size line, filled in once the size is known.
        out.extend_from_slice(b"00000000\r\n");
        match tunnel.transmit(lane, &mut out, STREAM_CHUNK).await {
            Ok(()) => {
                let size = format!("{:08x}", out.len() - 10);
                out[..8].copy_from_slice(size.as_bytes());
                out.extend_from_slice(CHUNK_END);
                conn.write_all(&out).await.map_err(HttpError::Io)?;
            }
            Err(LaneEnd::Superseded) | Err(LaneEnd::Closed(_)) => return Ok(()),
        }
    }
}

/// Poll shape, station to agent: a long poll, again and again.
async fn poll_lane(
    shared: &Shared,
    tunnel: &Tunnel,
    session: &SessionId,
    backoff: &mut Backoff,
) -> Result<(), CarrierError> {
    let client = &shared.client;
    let mut conn = None;
    let mut reader = RecordReader::default();
    let mut scratch = Vec::new();
    let max_reply = (POLL_BODY_MAX + MAX_RECORD) as u64;
    while tunnel.closed().is_none() {
        let mut proof = Vec::new();
        tunnel.seal_ack(&mut proof);
        let wait = POLL_WAIT + REPLY_TIMEOUT;
        let reply =
            client.exchange(&mut conn, session, Verb::Poll, &proof, wait, max_reply).await?;
        receive(tunnel, &reply, &mut reader, &mut scratch)?;
        backoff.reset();
    }
    Ok(())
}

/// Poll shape, agent to station: a request whenever there is data.
async fn push_lane(
    shared: &Shared,
    tunnel: &Tunnel,
    session: &SessionId,
    backoff: &mut Backoff,
) -> Result<(), CarrierError> {
    let client = &shared.client;
    let mut conn = None;
    let mut reader = RecordReader::default();
    let mut scratch = Vec::new();
    let mut body = Vec::with_capacity(POLL_BODY_MAX + MAX_RECORD);
    loop {
        let lane = tunnel.begin_lane(Lane::Sequenced);
        body.clear();
        if tunnel.transmit(lane, &mut body, POLL_BODY_MAX).await.is_err() {
            return Ok(());
        }
        let reply = client
            .exchange(&mut conn, session, Verb::Push, &body, REPLY_TIMEOUT, DOWN_BODY_MAX)
            .await?;
        receive(tunnel, &reply, &mut reader, &mut scratch)?;
        backoff.reset();
    }
}
