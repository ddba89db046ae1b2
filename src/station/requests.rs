//! The station's HTTP face: one task per carrier connection, reading
//! requests and answering them.
//!
//! ```text
//!  request head (≤ HEAD_TIMEOUT) ─▶ carrier path? POST? ─▶ hello ─▶ handshake (rationed) ─▶ session
//!                                                       └▶ down / up / poll / push of a known session:
//!                                                          body must hold an authentic packet, else 403
//! ```
//!
//! Every refusal is a status code and a budgeted log line; a connection
//! counts as a stranger (see `admission`) until it carries an authentic packet.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::future;
use smol::net::TcpStream;

use super::peers;
use super::status::{HandshakeRefusal, Shape};
use super::{confirm, drive_session, lock, log_unknown_key, log_unlogged_refusals, Live, Shared};
use crate::admission::Slot;
use crate::carrier::conn::{HttpConn, MIN_READ_BUF_BYTES};
use crate::carrier::http::{self, BodyKind, HttpError, RequestHead};
use crate::carrier::link::Link;
use crate::carrier::poll::{self, POLL_BODY_MAX};
use crate::carrier::stream::LongBody;
use crate::carrier::{self, Verb, ACK_BODY_MAX};
use crate::core::session::{Lane, Limits};
use crate::core::streams::Side;
use crate::crypto::{RecordReader, SessionId, MAX_HANDSHAKE, MAX_RECORD};
use crate::tunnel::{BadBody, LaneEnd, Tunnel};

/// Time a client has to send a complete request head once it connected or
/// finished its previous request. Agents send at once; 10 s is generous.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle time allowed between requests on a kept-alive connection: longer
/// than an agent's longest pause between polls.
const IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// Time to read a bounded body (poll, push) from a connection that has
/// carried an authentic packet; strangers get [`HEAD_TIMEOUT`] for theirs.
pub(super) const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// A downlink write shorter than this (a few records: keepalives, acks, an
/// interactive stream's bytes) lets its buffer go before the lane waits for
/// more, as an idle device's does, maybe for hours; a longer one keeps it
/// for the next chunk, which grows it to [`carrier::stream::STREAM_CHUNK`] while busy.
const BUSY_DOWN_WRITE: usize = 4096;

/// Header fields of every carrier reply.
const REPLY_HEADERS: [(&str, &str); 3] = [
    ("Content-Type", "application/octet-stream"),
    ("Cache-Control", "no-store"),
    carrier::STATION_MARK,
];

pub(super) async fn deadline<T>(
    limit: Duration,
    work: impl std::future::Future<Output = Result<T, HttpError>>,
) -> Result<T, HttpError> {
    crate::task::within(limit, || HttpError::Timeout, work).await
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    /// The carrier listener: agents, through whatever is on the way.
    Agent,
    /// The cluster's peer listener: other stations, passing on requests
    /// (each vouched for, see `peers`), never passed on again.
    Peer,
}

/// How a request ended, for the connection loop.
pub(super) enum Outcome {
    /// Answered in full; the connection may serve another request.
    Done,
    /// Refused with this status and reason (for the log; `None` when
    /// logged already); the connection closes after it.
    Refuse(u16, Option<String>),
    /// Nothing more can be written (the peer left or a stream response ended).
    Close,
    /// The handshake budget is spent: 503, and the agent is told to come
    /// back after this many seconds; the connection closes after it.
    Busy(u64),
}

pub(super) fn serve_connection(
    shared: Arc<Shared>,
    socket: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    via: Via,
) -> impl std::future::Future<Output = ()> {
    let station = shared.clone();
    let link = async move {
        match via {
            // Boxed, as the handshake is below (`handle`): TLS's is large
            // and done once.
            Via::Agent => Box::pin(station.tls.accept(socket, HEAD_TIMEOUT)).await,
            // Stations talk plain HTTP on their own network; what matters in
            // the requests is sealed end to end, and each is vouched for.
            Via::Peer => Ok(Link::Plain(socket)),
        }
    };
    serve(shared, link, peer, slot, via)
}

/// Serves the requests of a connection once `link` has made it ready
/// (its TLS set up, if any); the tests make theirs in memory. The link's
/// making runs inside this one async fn: an async fn awaiting another
/// here cost the station binary 640 bytes more.
pub(super) async fn serve(
    shared: Arc<Shared>,
    link: impl std::future::Future<Output = std::io::Result<Link>>,
    peer: SocketAddr,
    slot: Slot,
    via: Via,
) {
    let link = match link.await {
        Ok(link) => link,
        Err(e) => {
            refuse_log(&shared, peer, 400, &format!("TLS handshake failed: {e}"));
            return;
        }
    };
    let mut conn = HttpConn::with_capacity(link, MIN_READ_BUF_BYTES);
    let mut slot = slot;
    let mut first = true;
    loop {
        let kept_alive = !first;
        let wait = if first { HEAD_TIMEOUT } else { IDLE_TIMEOUT };
        first = false;
        let head = match deadline(wait, conn.read_request()).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            // A kept-alive connection that carried no new request for
            // IDLE_TIMEOUT expires, closed without an answer as HTTP servers
            // do: an answer would wait unread and greet the agent's next
            // request on it instead of that request's own.
            Err(HttpError::Timeout) if kept_alive && !conn.has_buffered() => {
                log::debug!("{peer}: idle kept-alive connection closed");
                return;
            }
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
        let client = match via {
            Via::Agent => peer,
            Via::Peer => match peers::admit(&shared, &head, peer) {
                Ok(client) => client,
                Err(why) => {
                    let what = format!(
                        "{} {}: a forged station-to-station request: {why}",
                        head.method, head.target
                    );
                    refuse_log(&shared, peer, 403, &what);
                    let _ = conn.write_all(&http::error_response(403)).await;
                    return;
                }
            },
        };
        if via == Via::Peer && head.target == peers::EXPOSE_PATH {
            peers::serve_expose(&shared, conn, &head, client, peer).await;
            return;
        }
        let outcome = match handle(&shared, &mut conn, &head, client, &mut slot, via).await {
            Ok(outcome) => outcome,
            // An agent's lane that reconnects, or stops, leaves its request
            // unfinished: routine for a connection that proved itself, not
            // a refusal.
            Err(e @ (HttpError::Io(_) | HttpError::UnexpectedEof)) if slot.is_proven() => {
                log::debug!("{peer}: {} {} ended: {e}", head.method, head.target);
                Outcome::Close
            }
            Err(e) => Outcome::Refuse(e.status(), Some(e.to_string())),
        };
        match outcome {
            Outcome::Done if keep_alive => continue,
            Outcome::Done | Outcome::Close => return,
            Outcome::Refuse(status, reason) => {
                match reason {
                    Some(reason) => {
                        let what = format!("{} {}: {reason}", head.method, head.target);
                        refuse_log(&shared, peer, status, &what);
                    }
                    None => shared.counters.refused(status),
                }
                let _ = conn.write_all(&http::error_response(status)).await;
                return;
            }
            Outcome::Busy(retry_after) => {
                let what = format!(
                    "{} {}: too many handshakes this second; told to retry in {retry_after} s",
                    head.method, head.target
                );
                refuse_log(&shared, peer, 503, &what);
                let _ = conn.write_all(&http::busy_response(retry_after)).await;
                return;
            }
        }
    }
}

/// Logs a refusal, within the budget of [`RejectLog`].
pub(super) fn refuse_log(shared: &Shared, peer: SocketAddr, status: u16, what: &str) {
    shared.counters.refused(status);
    let (own_line, summary) = lock(&shared.rejects).admit(Instant::now());
    if let Some(count) = summary {
        log_unlogged_refusals(count);
    }
    if own_line {
        log::info!("{peer}: refused with {status}: {what}");
    }
}

async fn handle(
    shared: &Arc<Shared>,
    conn: &mut HttpConn<Link>,
    head: &RequestHead,
    peer: SocketAddr,
    slot: &mut Slot,
    via: Via,
) -> Result<Outcome, HttpError> {
    let Some((session, verb)) = carrier::parse_path(&head.target) else {
        return Ok(refuse(404, "not a carrier path"));
    };
    if head.method != "POST" {
        return Ok(refuse(405, "carrier requests are POST"));
    }
    // A handshake, a rekey and a request for another station's session
    // run once in a while and hold much (a handshake's state, a registry
    // query, a second connection), on the heap for their while: inline,
    // they would size the task of every connection, an idle lane's
    // included, for as long as it lives (issue 17).
    if verb == Verb::Hello {
        return Box::pin(hello(shared, conn, head, session, peer, slot)).await;
    }
    let live = lock(&shared.sessions).get(&session).cloned();
    let Some(live) = live else {
        return Box::pin(elsewhere(shared, conn, head, session, peer, slot, via)).await;
    };
    let req = Request { shared, head, live: &live, slot };
    match verb {
        Verb::Hello => unreachable!("handled above"),
        Verb::Rekey => Box::pin(rekey(req, conn, session, peer)).await,
        Verb::Down => down(req, conn).await,
        Verb::Up => up(req, conn).await,
        Verb::Poll => poll(req, conn).await,
        Verb::Push => push(req, conn).await,
    }
}

/// A request for a session not held here: passed on to the station of the
/// cluster that holds it, else refused.
async fn elsewhere(
    shared: &Arc<Shared>,
    conn: &mut HttpConn<Link>,
    head: &RequestHead,
    session: SessionId,
    peer: SocketAddr,
    slot: &mut Slot,
    via: Via,
) -> Result<Outcome, HttpError> {
    if let (Some(registry), Via::Agent) = (&shared.registry, via) {
        if let Ok(Some(holder)) = registry.session_holder(&session).await {
            if holder != registry.me() {
                // A session the cluster holds is a device's, not a
                // stranger's: its held polls, passed on for as long as
                // their hold, must not fill the strangers' bound (a fleet
                // behind a balancer without stickiness was refused 503
                // for minutes after a failover). The holder still checks
                // every packet, and max_connections bounds these.
                slot.promote();
                return peers::forward(shared, conn, head, peer, holder).await;
            }
        }
    }
    // 410, not 404: the agent must tell "start a new session" apart
    // from a path that is wrong or was garbled on the way.
    Ok(refuse(410, "no such session (the station restarted or it timed out)"))
}

fn refuse(status: u16, reason: &str) -> Outcome {
    Outcome::Refuse(status, Some(reason.to_owned()))
}

/// The refusal of a body whose records do not open, whichever request
/// carried it.
fn not_authentic(e: &BadBody) -> Outcome {
    refuse(403, &format!("{e} (changed on the way, or replayed)"))
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

    /// Feeds a bounded body of records to the session as it arrives, so no
    /// copy of a push (up to [`POLL_BODY_MAX`]) is held. A body without an
    /// authentic packet, or with a forged or replayed one, gets the
    /// refusal this returns (the packets before a forged one are
    /// delivered, as from a body read whole); the connection then closes
    /// with the rest of the body unread.
    async fn receive_body(
        &mut self,
        conn: &mut HttpConn<Link>,
        max: u64,
        shape: Shape,
    ) -> Result<Result<(), Outcome>, HttpError> {
        let mut reader = RecordReader::default();
        let mut scratch = Vec::new();
        let mut authentic = 0;
        let limit = self.body_timeout();
        let (head, tunnel) = (self.head, &self.live.tunnel);
        let reading = async {
            let mut body = conn.body(head.body, Some(max));
            while let Some(bytes) = body.next().await? {
                match tunnel.receive(bytes, &mut reader, &mut scratch) {
                    Ok(n) => authentic += n,
                    Err(e) => return Ok(Err(e)),
                }
            }
            Ok(Ok(()))
        };
        // Boxed: the body reader's state is large, and inline it would size
        // the task of every connection, held polls' and downlinks' too.
        Ok(match Box::pin(deadline(limit, reading)).await? {
            Ok(()) if authentic > 0 && reader.is_clean() => {
                self.proven(shape);
                Ok(())
            }
            Ok(()) => Err(refuse(403, "no authentic packet in the body")),
            Err(e) => Err(not_authentic(&e)),
        })
    }

    /// The request carried an authentic packet over a carrier of `shape`.
    fn proven(&mut self, shape: Shape) {
        if !self.slot.is_proven() {
            self.live.status.carrier_connections.fetch_add(1, Ordering::Relaxed);
        }
        self.slot.promote();
        self.live.status.seen(shape);
        confirm(self.shared, self.live);
    }
}

/// Reads a small bounded body whole (a handshake message).
async fn read_body(
    conn: &mut HttpConn<Link>,
    head: &RequestHead,
    max: u64,
    limit: Duration,
) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    deadline(limit, conn.body(head.body, Some(max)).read_to_end(&mut body)).await?;
    Ok(body)
}

/// Room kept in front of a reply body for its head (status line, the
/// [`REPLY_HEADERS`], `Content-Length` and `Connection`: under 160 bytes).
const HEAD_ROOM: usize = 256;

/// A buffer that starts with [`HEAD_ROOM`] bytes for the reply's head,
/// for a body to be appended after them.
fn reply_buffer(capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEAD_ROOM + capacity);
    out.resize(HEAD_ROOM, 0);
    out
}

async fn respond(
    conn: &mut HttpConn<Link>,
    keep_alive: bool,
    body: &[u8],
) -> Result<Outcome, HttpError> {
    let mut out = reply_buffer(body.len());
    out.extend_from_slice(body);
    respond_in_place(conn, keep_alive, out).await
}

/// Sends a 200 reply whose body follows the head room of `out`
/// ([`reply_buffer`]): the head is written into that room, so head and a
/// poll reply of up to [`POLL_BODY_MAX`] leave in one write, uncopied.
async fn respond_in_place(
    conn: &mut HttpConn<Link>,
    keep_alive: bool,
    mut out: Vec<u8>,
) -> Result<Outcome, HttpError> {
    let kind = BodyKind::Length((out.len() - HEAD_ROOM) as u64);
    let mut head = Vec::with_capacity(HEAD_ROOM);
    http::write_response_head(&mut head, 200, "OK", &REPLY_HEADERS, kind, keep_alive);
    let start = HEAD_ROOM.checked_sub(head.len()).expect("the reply head fits its room");
    out[start..HEAD_ROOM].copy_from_slice(&head);
    conn.write_all(&out[start..]).await?;
    Ok(Outcome::Done)
}

async fn hello(
    shared: &Arc<Shared>,
    conn: &mut HttpConn<Link>,
    head: &RequestHead,
    session: SessionId,
    peer: SocketAddr,
    slot: &mut Slot,
) -> Result<Outcome, HttpError> {
    let msg = read_body(conn, head, MAX_HANDSHAKE as u64, HEAD_TIMEOUT).await?;
    let counters = &shared.counters;
    if shared.draining.load(Ordering::Acquire) {
        counters.handshake_refused(HandshakeRefusal::Stopping);
        return Ok(refuse(503, "the station is stopping"));
    }
    // The Diffie-Hellman work below is what strangers could make us do
    // for free: it is rationed.
    if let Some(busy) = rationed(shared) {
        return Ok(busy);
    }
    let responder = match shared.respond(&msg) {
        Ok(responder) => responder,
        Err(e) => return Ok(not_a_handshake(shared, &e)),
    };
    let roster = shared.roster();
    let Some(device) = roster.device_of(&responder.device) else {
        log_unknown_key(shared, &responder.device, peer);
        return Ok(Outcome::Refuse(403, None));
    };
    if let Some(refusal) = lock(&shared.clones).refusal(&device.name, Instant::now()) {
        counters.duplicate_keys.fetch_add(1, Ordering::Relaxed);
        counters.handshake_refused(HandshakeRefusal::DuplicateKey);
        if let Some([first, second]) = refusal.log {
            let show = |a: Option<SocketAddr>| a.map_or("?".to_owned(), |a| a.to_string());
            log::warn!(
                "device {}: two agents use its key (sessions from {} and {}); refusing the \
                 handshake from {peer} for {} s more (a cloned device image? give each device \
                 its own key)",
                device.name,
                show(first),
                show(second),
                refusal.retry_after
            );
        }
        return Ok(Outcome::Refuse(409, None));
    }
    if responder.session_id != session || lock(&shared.sessions).contains_key(&session) {
        counters.handshake_refused(HandshakeRefusal::Malformed);
        return Ok(refuse(400, "handshake for a session id it does not own"));
    }
    let device_key = responder.device;
    let (reply, transport) = match responder.accept() {
        Ok(accepted) => accepted,
        Err(e) => {
            log::warn!("{peer}: handshake with device {} failed: {e}", device.name);
            counters.handshake_refused(HandshakeRefusal::Malformed);
            return Ok(Outcome::Refuse(400, None));
        }
    };
    slot.promote();
    let (tunnel, incoming) = Tunnel::new(Side::Station, transport, session_limits(shared, head));
    let live = Live::new(session, device_key, device.name.clone(), tunnel, peer);
    counters.handshakes.fetch_add(1, Ordering::Relaxed);
    lock(&shared.sessions).insert(session, live.clone());
    // Recorded before the reply, so that the agent's next request finds
    // the session whichever station the balancer gives it to.
    if let Some(registry) = &shared.registry {
        registry.claim(&session, &device.name).await;
    }
    log::info!(
        "device {} handshake from {peer} (session {})",
        device.name,
        carrier::short(&session)
    );
    let task_shared = shared.clone();
    shared.scope.spawn(drive_session(task_shared, live, incoming));
    respond(conn, head.keep_alive, &reply).await
}

/// Takes a handshake from the budget, or the busy refusal to answer with.
fn rationed(shared: &Shared) -> Option<Outcome> {
    let retry_after = lock(&shared.handshakes).take(Instant::now()).err()?;
    shared.counters.handshake_refused(HandshakeRefusal::Busy);
    Some(Outcome::Busy(retry_after))
}

/// The refusal of a first handshake message no station key opens.
fn not_a_handshake(shared: &Shared, e: &crate::crypto::CryptoError) -> Outcome {
    shared.counters.bad_handshakes.fetch_add(1, Ordering::Relaxed);
    shared.counters.handshake_refused(HandshakeRefusal::Malformed);
    refuse(400, &format!("not a postern handshake: {e}"))
}

/// The station's limits for a session whose hello is `head`: the keepalive
/// interval the agent states (a metered link's owner chose it for both
/// directions), and a liveness timeout that outlives two of them.
fn session_limits(shared: &Shared, head: &RequestHead) -> Limits {
    let limits = shared.limits.clone();
    match carrier::hello_keepalive(&head.target) {
        Some(keepalive) => limits.following(keepalive),
        None => limits,
    }
}

/// New keys for a running session, from a fresh handshake with whichever
/// of its keys the device now uses. The records after the handshake must
/// open with the session's current keys: a stranger cannot ask, and a
/// replayed request fails the session's replay window before any
/// Diffie-Hellman work is done.
async fn rekey(
    req: Request<'_>,
    conn: &mut HttpConn<Link>,
    session: SessionId,
    peer: SocketAddr,
) -> Result<Outcome, HttpError> {
    let (shared, live) = (req.shared, req.live);
    let max = (MAX_HANDSHAKE + 2) as u64 + ACK_BODY_MAX;
    let body = read_body(conn, req.head, max, req.body_timeout()).await?;
    let Some((msg, proof)) = carrier::split_rekey_body(&body) else {
        return Ok(refuse(400, "a rekey body without its handshake message"));
    };
    let mut reader = RecordReader::default();
    match live.tunnel.receive(proof, &mut reader, &mut Vec::new()) {
        // Proof of the device, not carrier traffic: the carrier shape in
        // the status stays what the lanes use.
        Ok(n) if n > 0 && reader.is_clean() => req.slot.promote(),
        Ok(_) => return Ok(refuse(403, "no authentic packet in the rekey body")),
        Err(e) => return Ok(not_authentic(&e)),
    }
    if let Some(busy) = rationed(shared) {
        return Ok(busy);
    }
    let responder = match shared.respond(msg) {
        Ok(responder) => responder,
        Err(e) => return Ok(not_a_handshake(shared, &e)),
    };
    let roster = shared.roster();
    if roster.device_of(&responder.device).map(|d| &d.name) != Some(&live.name) {
        log::warn!(
            "{peer}: device {} asked to renew session {} with key {}, which is not one of its keys; refused",
            live.name,
            carrier::short(&session),
            responder.device.fingerprint()
        );
        shared.counters.handshake_refused(HandshakeRefusal::UnknownKey);
        return Ok(Outcome::Refuse(403, None));
    }
    if responder.session_id != session {
        shared.counters.handshake_refused(HandshakeRefusal::Malformed);
        return Ok(refuse(400, "rekey handshake for another session id"));
    }
    let device_key = responder.device;
    let (reply, transport) = match responder.accept() {
        Ok(accepted) => accepted,
        Err(e) => {
            shared.counters.handshake_refused(HandshakeRefusal::Malformed);
            return Ok(refuse(400, &format!("rekey handshake failed: {e}")));
        }
    };
    live.tunnel.offer_keys(transport);
    *lock(&live.key) = device_key;
    log::info!(
        "device {} renewed the keys of session {} (device key {})",
        live.name,
        carrier::short(&session),
        device_key.fingerprint()
    );
    respond(conn, req.head.keep_alive, &reply).await
}

async fn down(mut req: Request<'_>, conn: &mut HttpConn<Link>) -> Result<Outcome, HttpError> {
    let (head, live) = (req.head, req.live);
    if let Err(refused) = req.receive_body(conn, ACK_BODY_MAX, Shape::Stream).await? {
        return Ok(refused);
    }
    // Nothing more is read on this connection: its read buffer goes.
    conn.release();
    let lane = live.tunnel.begin_lane(Lane::Data);
    // An HTTP/1.0 hop (nginx's default upstream protocol) cannot take a
    // chunked response; the body then ends when the connection closes.
    let body = LongBody::new(head.minor_version >= 1);
    // Grows to a chunk when the downlink is busy, goes when it idles.
    let mut out = Vec::new();
    // nginx streams a response that asks for it; other buffering proxies
    // are found out by the agent, which then switches to poll.
    let [first, second, third] = REPLY_HEADERS;
    let headers = [first, second, third, ("X-Accel-Buffering", "no")];
    http::write_response_head(&mut out, 200, "OK", &headers, body.kind(), false);
    body.ack(&live.tunnel, &mut out);
    loop {
        conn.write_all(&out).await?;
        if out.len() < BUSY_DOWN_WRITE {
            // Idle: wait holding no buffer (only the next size line).
            out = Vec::new();
        } else {
            out.clear();
        }
        if let Err(end) = body.records(&live.tunnel, lane, &mut out).await {
            if let LaneEnd::Closed(reason) = &end {
                log::debug!("device {}: downlink ends: {reason}", live.name);
            }
            body.end(&mut out);
            conn.write_all(&out).await?;
            return Ok(Outcome::Close);
        }
    }
}

async fn up(mut req: Request<'_>, conn: &mut HttpConn<Link>) -> Result<Outcome, HttpError> {
    let (head, live) = (req.head, req.live);
    // A long body streams through this buffer: give it the full size. The
    // session id in the path bounds who gets this far to those who saw it.
    conn.grow();
    let mut reader = RecordReader::default();
    let mut scratch = Vec::new();
    {
        let mut body = conn.body(head.body, None);
        // The first bytes must come promptly; after that an uplink may idle
        // as long as the session does (keepalives arrive well within it):
        // the session's own timeout, which outlives two of the agent's
        // keepalives.
        let idle = live.tunnel.idle_timeout();
        let mut wait = HEAD_TIMEOUT;
        while let Some(bytes) = deadline(wait, body.next()).await? {
            wait = idle;
            let authentic = match live.tunnel.receive(bytes, &mut reader, &mut scratch) {
                Ok(n) => n,
                Err(e) => return Ok(not_authentic(&e)),
            };
            if authentic > 0 {
                req.proven(Shape::Stream);
            }
            if !req.slot.is_proven() && reader.is_clean() {
                return Ok(refuse(403, "no authentic packet in the uplink"));
            }
        }
    }
    respond(conn, head.keep_alive, &[]).await
}

async fn poll(mut req: Request<'_>, conn: &mut HttpConn<Link>) -> Result<Outcome, HttpError> {
    let (head, live) = (req.head, req.live);
    if let Err(refused) = req.receive_body(conn, POLL_BODY_MAX as u64, Shape::Poll).await? {
        return Ok(refused);
    }
    let lane = if poll::poll_continues(&head.target) {
        live.tunnel.join_lane(Lane::Sequenced)
    } else {
        live.tunnel.begin_lane(Lane::Sequenced)
    };
    let mut out = reply_buffer(0);
    let hold = poll::poll_wait(&head.target);
    // Nothing is read while the poll is held, maybe for minutes.
    conn.release();
    let wait = async {
        smol::Timer::after(hold).await;
        Ok(())
    };
    // Superseded or closed: answer with just an ack; the agent moves on.
    let _ = future::or(live.tunnel.transmit(lane, &mut out, POLL_BODY_MAX), wait).await;
    if out.len() == HEAD_ROOM {
        live.tunnel.seal_ack(&mut out);
    }
    respond_in_place(conn, head.keep_alive, out).await
}

async fn push(mut req: Request<'_>, conn: &mut HttpConn<Link>) -> Result<Outcome, HttpError> {
    let (head, live) = (req.head, req.live);
    let max = POLL_BODY_MAX as u64 + MAX_RECORD as u64;
    if let Err(refused) = req.receive_body(conn, max, Shape::Poll).await? {
        return Ok(refused);
    }
    // The answer carries what the session has to send now, not just an
    // ack: credit for the agent's uploads (which would otherwise wait a
    // round trip for the next poll) and downlink packets, beside the polls.
    // The agent reorders them with its polls' replies, and asks for a
    // resend from its acknowledged point when a push fails.
    let lane = live.tunnel.join_lane(Lane::Sequenced);
    let mut out = reply_buffer(0);
    let _ = live.tunnel.transmit_now(lane, &mut out, POLL_BODY_MAX);
    if out.len() == HEAD_ROOM {
        live.tunnel.seal_ack(&mut out);
    }
    respond_in_place(conn, head.keep_alive, out).await
}

#[cfg(test)]
mod tests {
    use futures_lite::future::block_on;

    use super::*;
    use crate::carrier::harness::Peer;
    use crate::carrier::http::ResponseHead;
    use crate::station::fixture::{exchange, refusals, session, station};

    fn request(method: &str, target: &str, fields: &str, body: &[u8]) -> Vec<u8> {
        let mut out =
            format!("{method} {target} HTTP/1.1\r\nHost: station\r\n{fields}\r\n").into_bytes();
        out.extend_from_slice(body);
        out
    }

    fn post(session: &SessionId, verb: Verb, body: &[u8]) -> Vec<u8> {
        let length = format!("Content-Length: {}\r\n", body.len());
        request("POST", &carrier::path("/", session, verb), &length, body)
    }

    /// A packet the agent seals now: what proves a request.
    fn sealed_ack(agent: &Tunnel) -> Vec<u8> {
        let mut packet = Vec::new();
        agent.seal_ack(&mut packet);
        packet
    }

    /// An answer as the agent reads it.
    struct Answer {
        head: ResponseHead,
        body: Vec<u8>,
    }

    fn read_answer(answer: &[u8]) -> Answer {
        let mut conn = HttpConn::new(Peer::whole(answer));
        block_on(async {
            let head = conn.read_response(false).await.expect("an HTTP response");
            let mut body = Vec::new();
            conn.body(head.body, None).read_to_end(&mut body).await.expect("its body");
            Answer { head, body }
        })
    }

    #[test]
    fn the_longest_reply_head_fits_its_room() {
        let mut head = Vec::new();
        let kind = BodyKind::Length(u64::MAX);
        http::write_response_head(&mut head, 200, "OK", &REPLY_HEADERS, kind, false);
        assert!(
            head.len() <= HEAD_ROOM,
            "{} bytes: {}",
            head.len(),
            String::from_utf8_lossy(&head)
        );
    }

    /// What the agent relies on to tell "start a new session" from a
    /// garbled path: 410, with the station's own mark.
    #[test]
    fn a_request_for_a_session_the_station_does_not_hold_is_gone_and_marked() {
        let shared = station();
        let answer = exchange(&shared, Via::Agent, &post(&[1; 16], Verb::Down, b""));
        assert_eq!(
            String::from_utf8_lossy(&answer),
            "HTTP/1.1 410 Gone\r\nContent-Type: text/plain\r\nCache-Control: no-store\r\n\
             X-Postern: station\r\nContent-Length: 5\r\nConnection: close\r\n\r\ngone\n"
        );
        assert_eq!(refusals(&shared), [("unknown_session", 1)].into());
    }

    #[test]
    fn a_path_that_is_not_the_carriers_is_not_found_and_other_methods_not_allowed() {
        let shared = station();
        let answer = exchange(&shared, Via::Agent, &request("GET", "/", "", b""));
        assert_eq!(answer, http::error_response(404));
        // The verb must be one of the carrier's too.
        let garbled = format!("/p1/{}/fetch", carrier::hex(&[1; 16]));
        let answer = exchange(&shared, Via::Agent, &request("POST", &garbled, "", b""));
        assert_eq!(answer, http::error_response(404));
        let carrier_path = carrier::path("/", &[1; 16], Verb::Poll);
        let answer = exchange(&shared, Via::Agent, &request("GET", &carrier_path, "", b""));
        assert_eq!(answer, http::error_response(405));
        assert!(String::from_utf8_lossy(&answer).contains("\r\nAllow: GET, POST\r\n"));
        assert_eq!(refusals(&shared), [("method", 1), ("not_found", 2)].into());
    }

    /// A body that is not the session's packets is refused, whether it is
    /// garbage or a packet seen before, and proves nothing.
    #[test]
    fn a_body_without_an_authentic_packet_is_forbidden() {
        let shared = station();
        let (id, live, agent) = session(&shared);
        let answer = exchange(&shared, Via::Agent, &post(&id, Verb::Push, b"not a packet"));
        assert_eq!(answer, http::error_response(403));
        let ack = sealed_ack(&agent);
        // One bit changed on the way.
        let mut tampered = ack.clone();
        *tampered.last_mut().expect("a sealed packet") ^= 1;
        let answer = exchange(&shared, Via::Agent, &post(&id, Verb::Push, &tampered));
        assert_eq!(answer, http::error_response(403));
        assert!(!live.confirmed.load(Ordering::Acquire));
        let answer = exchange(&shared, Via::Agent, &post(&id, Verb::Push, &ack));
        assert_eq!(read_answer(&answer).head.status, 200);
        // The same packet again is a replay.
        let answer = exchange(&shared, Via::Agent, &post(&id, Verb::Push, &ack));
        assert_eq!(answer, http::error_response(403));
        assert_eq!(refusals(&shared), [("not_authentic", 3)].into());
    }

    /// A push with an authentic packet is answered with the session's own
    /// packets, and the connection serves the agent's next request.
    #[test]
    fn an_authentic_push_is_answered_with_packets_and_the_connection_kept() {
        let shared = station();
        let (id, live, agent) = session(&shared);
        let ack = sealed_ack(&agent);
        let mut requests = post(&id, Verb::Push, &ack);
        requests.extend(request("GET", "/", "", b""));
        let answer = exchange(&shared, Via::Agent, &requests);
        let not_found = http::error_response(404);
        let (first, second) = answer.split_at(answer.len() - not_found.len());
        assert_eq!(second, not_found);
        let Answer { head, body } = read_answer(first);
        assert_eq!(head.status, 200);
        assert_eq!(head.header("X-Postern"), Some(&b"station"[..]));
        assert!(head.keep_alive);
        let authentic = agent.receive(&body, &mut RecordReader::default(), &mut Vec::new());
        assert!(authentic.expect("the station's packets open") > 0);
        assert!(live.confirmed.load(Ordering::Acquire));
        assert_eq!(live.status.carrier_connections.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_body_longer_than_its_verb_allows_is_refused_before_it_is_read() {
        let shared = station();
        let (id, _, _) = session(&shared);
        for (verb, max) in [
            (Verb::Push, (POLL_BODY_MAX + MAX_RECORD) as u64),
            (Verb::Poll, POLL_BODY_MAX as u64),
            (Verb::Down, ACK_BODY_MAX),
            (Verb::Hello, MAX_HANDSHAKE as u64),
        ] {
            let length = format!("Content-Length: {}\r\n", max + 1);
            let target = carrier::path("/", &id, verb);
            let answer = exchange(&shared, Via::Agent, &request("POST", &target, &length, b""));
            assert_eq!(answer, http::error_response(413), "{verb:?}");
        }
        assert_eq!(refusals(&shared), [("too_large", 4)].into());
    }

    /// A head that does not end is bounded: refused at its limit, or
    /// dropped unanswered when the client leaves before its end.
    #[test]
    fn a_head_that_never_ends_is_bounded() {
        let shared = station();
        let mut head = b"POST / HTTP/1.1\r\n".to_vec();
        while head.len() <= http::MAX_HEAD_BYTES {
            head.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(exchange(&shared, Via::Agent, &head), http::error_response(431));
        let cut = exchange(&shared, Via::Agent, b"POST /p1/ HTTP/1.1\r\nHost: sta");
        assert_eq!(cut, b"");
        assert_eq!(refusals(&shared), [("malformed", 1), ("too_large", 1)].into());
    }

    #[test]
    fn a_hello_that_is_not_a_handshake_is_a_bad_request() {
        let shared = station();
        let answer = exchange(&shared, Via::Agent, &post(&[3; 16], Verb::Hello, b"hello?"));
        assert_eq!(answer, http::error_response(400));
        assert_eq!(shared.counters.bad_handshakes.load(Ordering::Relaxed), 1);
        assert!(lock(&shared.sessions).is_empty());
        // A stopping station takes no handshake at all.
        shared.draining.store(true, Ordering::Release);
        let answer = exchange(&shared, Via::Agent, &post(&[3; 16], Verb::Hello, b"hello?"));
        assert_eq!(answer, http::error_response(503));
        assert_eq!(shared.counters.bad_handshakes.load(Ordering::Relaxed), 1);
    }

    fn chunked(session: &SessionId, verb: Verb, body: &[u8]) -> Vec<u8> {
        let target = carrier::path("/", session, verb);
        let mut out = request("POST", &target, "Transfer-Encoding: chunked\r\n", b"");
        http::write_chunk_header(&mut out, body.len());
        out.extend_from_slice(body);
        out.extend_from_slice(http::CHUNK_END);
        out.extend_from_slice(http::LAST_CHUNK);
        out
    }

    /// An uplink's records reach the session and the whole body is
    /// answered with an empty 200; records that do not open are refused
    /// as push, poll and down refuse them.
    #[test]
    fn an_uplink_is_taken_whole_and_one_with_forged_records_refused() {
        let shared = station();
        let (id, live, agent) = session(&shared);
        let ack = sealed_ack(&agent);
        let answer = read_answer(&exchange(&shared, Via::Agent, &chunked(&id, Verb::Up, &ack)));
        assert_eq!((answer.head.status, answer.head.body), (200, BodyKind::Length(0)));
        assert_eq!(answer.head.header("X-Postern"), Some(&b"station"[..]));
        assert!(live.confirmed.load(Ordering::Acquire));
        // The same records again: a replay the session's window refuses.
        let answer = exchange(&shared, Via::Agent, &chunked(&id, Verb::Up, &ack));
        assert_eq!(answer, http::error_response(403));
        assert_eq!(refusals(&shared), [("not_authentic", 1)].into());
    }
}
