//! Station to station, in a cluster: a carrier request for a session held
//! by another station is passed to it, and a reverse client for a device
//! held elsewhere is relayed to the station holding it.
//!
//! ```text
//! agent ─▶ balancer ─▶ station A: no such session ─▶ registry: B holds it
//!                         └─ POST <same path> + X-Postern-Peer ─▶ B's peer listener ─▶ requests::handle
//! client ─▶ A's expose port ─▶ registry: B holds the device
//!                         └─ POST /.postern/expose, 101 ─▶ B ─▶ the device's session ─▶ service
//! ```
//!
//! The forwarding station reads no record: they are sealed between agent
//! and holder, which checks them as it would on its own listener. Each
//! request between stations carries a MAC under a key derived from the
//! station key they share, over its time, method and target; the peer
//! listener refuses any other. A replay within [`CLOCK_SKEW`] can only
//! repeat records the session's replay window rejects, or open a reverse
//! connection, which any client of an expose port can do.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blake2::digest::Mac;
use blake2::Blake2sMac256;
use futures_lite::{future, io, AsyncWriteExt};
use smol::net::{Shutdown, TcpStream};

use super::expose::{self, Client};
use super::requests::Outcome;
use super::requests::{deadline, refuse_log, BODY_TIMEOUT};
use super::{live_session, lock, Live, Shared};
use crate::carrier::conn::HttpConn;
use crate::carrier::http::{self, BodyKind, HttpError, RequestHead, CHUNK_END, LAST_CHUNK};
use crate::carrier::link::Link;
use crate::carrier::{self, Verb, STATION_MARK};
use crate::connect::ConnectError;
use crate::keys::PrivateKey;

/// The header that vouches for a request from another station.
const PEER_HEADER: &str = "X-Postern-Peer";
/// Who sent the request to the forwarding station, for the holder's logs.
const CLIENT_HEADER: &str = "X-Postern-Client";
const DEVICE_HEADER: &str = "X-Postern-Device";
const SERVICE_HEADER: &str = "X-Postern-Service";
/// The path of a relayed reverse connection.
pub(super) const EXPOSE_PATH: &str = "/.postern/expose";
const UPGRADE: &str = "postern-expose";

/// Largest difference between two stations' clocks a request survives
/// (stations run NTP; this is the window a captured request replays in).
const CLOCK_SKEW: u64 = 60;

/// Time another station has to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The response header fields a forwarded reply keeps.
const KEPT_FIELDS: [&str; 4] =
    ["Content-Type", "Cache-Control", "X-Accel-Buffering", "Retry-After"];

/// The key station-to-station MACs are made with: derived from the
/// station's static key, which every station of a cluster has (agents pin
/// its public half), and useless for anything else.
fn peer_key(station: &PrivateKey) -> [u8; 32] {
    let mut mac = Blake2sMac256::new_with_salt_and_personal(station.as_bytes(), b"", b"pstrnpr1")
        .expect("a 32-byte key and an 8-byte personalisation fit BLAKE2s");
    mac.update(b"postern station-to-station requests");
    mac.finalize().into_bytes().into()
}

fn mac(key: &[u8; 32], secs: u64, method: &str, target: &str) -> Blake2sMac256 {
    let mut mac = <Blake2sMac256 as Mac>::new_from_slice(key).expect("a 32-byte key fits");
    mac.update(format!("{secs} {method} {target}").as_bytes());
    mac
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The [`PEER_HEADER`] value for a request from this station.
fn vouch(shared: &Shared, method: &str, target: &str) -> String {
    vouch_at(&shared.keys().current, unix_secs(), method, target)
}

/// The [`PEER_HEADER`] value for a request made at `secs` by a station
/// with key `station`.
fn vouch_at(station: &PrivateKey, secs: u64, method: &str, target: &str) -> String {
    let key = peer_key(station);
    format!("{secs} {}", carrier::hex(&mac(&key, secs, method, target).finalize().into_bytes()))
}

/// Checks that `head` comes from a station of the cluster; returns the
/// address of the client it acts for.
pub(super) fn admit(
    shared: &Shared,
    head: &RequestHead,
    from: SocketAddr,
) -> Result<SocketAddr, &'static str> {
    let value = head.header(PEER_HEADER).ok_or("no X-Postern-Peer field")?;
    let value = std::str::from_utf8(value).map_err(|_| "a malformed X-Postern-Peer field")?;
    let (secs, tag) = value.split_once(' ').ok_or("a malformed X-Postern-Peer field")?;
    let secs: u64 = secs.parse().map_err(|_| "a malformed X-Postern-Peer field")?;
    if unix_secs().abs_diff(secs) > CLOCK_SKEW {
        return Err(
            "an X-Postern-Peer time more than 60 s off (replayed, or the stations' clocks differ)",
        );
    }
    let tag = carrier::unhex(tag).ok_or("a malformed X-Postern-Peer field")?;
    let keys = shared.keys();
    let authentic = std::iter::once(&keys.current).chain(&keys.next).any(|key| {
        mac(&peer_key(key), secs, &head.method, &head.target).verify_slice(&tag).is_ok()
    });
    if !authentic {
        return Err("an X-Postern-Peer MAC that no key of this station made (not a station of this cluster)");
    }
    let client = head.header(CLIENT_HEADER).and_then(|v| std::str::from_utf8(v).ok()?.parse().ok());
    Ok(client.unwrap_or(from))
}

/// Idle connections kept per station: enough for the forwarded polls and
/// pushes of a busy balancer between two forwards.
const POOL_PER_PEER: usize = 16;

/// Longest a connection idles in the pool: well within the holder's own
/// idle limit for kept-alive connections (75 s), so it is not closed under
/// a request.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// Kept-alive connections to the other stations, for forwarded requests
/// with bounded bodies: a connection made per request cost a forwarded
/// poll three times the direct round trip (docs/BENCHMARKS.md). Bounded
/// per station; the stations are those the registry names.
#[derive(Default)]
pub(super) struct Pool(Mutex<HashMap<SocketAddr, Vec<(TcpStream, Instant)>>>);

impl Pool {
    /// An idle connection to `station` that is still open, if one is kept.
    async fn take(&self, station: SocketAddr) -> Option<TcpStream> {
        loop {
            let socket = {
                let mut idle = lock(&self.0);
                let kept = idle.get_mut(&station)?;
                let found = kept.pop();
                if kept.is_empty() {
                    idle.remove(&station);
                }
                found
            };
            let (socket, since) = socket?;
            if since.elapsed() >= POOL_IDLE {
                continue;
            }
            // Readable while idle means the holder closed it (or sent what
            // it must not): not for a new request.
            let mut byte = [0u8; 1];
            if future::poll_once(socket.peek(&mut byte)).await.is_none() {
                return Some(socket);
            }
        }
    }

    fn put(&self, station: SocketAddr, socket: TcpStream) {
        let mut idle = lock(&self.0);
        let kept = idle.entry(station).or_default();
        kept.retain(|(_, since)| since.elapsed() < POOL_IDLE);
        if kept.len() < POOL_PER_PEER {
            kept.push((socket, Instant::now()));
        }
    }
}

async fn connect(station: SocketAddr) -> std::io::Result<TcpStream> {
    crate::connect::connect(station, CONNECT_TIMEOUT).await.map_err(|e| match e {
        ConnectError::Failed(e) => e,
        ConnectError::NoAnswer(_) => std::io::ErrorKind::TimedOut.into(),
    })
}

/// Passes the carrier request `head` (its body still unread on `conn`) to
/// `holder`, the station that holds its session, and its response back.
pub(super) async fn forward(
    shared: &Arc<Shared>,
    conn: &mut HttpConn<Link>,
    head: &RequestHead,
    client: SocketAddr,
    holder: SocketAddr,
) -> Result<Outcome, HttpError> {
    // Stream lanes live long and carry one request each; polls and pushes
    // come one after another and reuse a kept connection.
    let poolable = head.body != BodyKind::Chunked;
    let kept = match poolable {
        true => shared.peer_pool.take(holder).await,
        false => None,
    };
    let upstream = match kept {
        Some(socket) => socket,
        None => match connect(holder).await {
            Ok(socket) => {
                shared.counters.peer_connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                socket
            }
            Err(e) => {
                // Its record outlives a station that died: the agent starts
                // a new session, here or wherever the balancer sends it.
                let why =
                    format!("station {holder}, which holds the session, does not answer: {e}");
                return Ok(Outcome::Refuse(410, Some(why)));
            }
        },
    };
    shared.counters.forwarded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut out = Vec::new();
    let client_text = client.to_string();
    let vouched = vouch(shared, &head.method, &head.target);
    let mut fields = vec![(PEER_HEADER, vouched.as_str()), (CLIENT_HEADER, client_text.as_str())];
    if !poolable {
        fields.push(("Connection", "close"));
    }
    http::write_request_head(
        &mut out,
        &head.method,
        &head.target,
        &holder.to_string(),
        &fields,
        head.body,
    );
    let mut writer = upstream.clone();
    writer.write_all(&out).await?;
    // The holder may answer (a refusal) before the body ends: then the
    // rest of the body is not needed.
    let answered = async {
        let _ = upstream.peek(&mut [0]).await;
        Ok(false)
    };
    let chunked = head.body == BodyKind::Chunked;
    let mut to = Writer::Station(&mut writer);
    let sent = async { relay_body(conn, head.body, &mut to, chunked).await.map(|()| true) };
    // Whether the agent's whole body was read: if not, its connection
    // cannot carry another request.
    let whole = future::or(sent, answered).await?;

    let mut from = HttpConn::new(upstream);
    // A holder that took the request and hangs must not keep this task,
    // and the agent's connection, for ever.
    let response = deadline(answer_within(head), from.read_response(false)).await?;
    let body = match response.body {
        BodyKind::Chunked if head.minor_version == 0 => BodyKind::UntilClose,
        kind => kind,
    };
    // A refusal ends the agent's connection, as the station's own do.
    let keep_alive =
        whole && head.keep_alive && response.status == 200 && body != BodyKind::UntilClose;
    let mut fields: Vec<(&str, &str)> = vec![STATION_MARK];
    for name in KEPT_FIELDS {
        if let Some(value) = response.header(name).and_then(|v| std::str::from_utf8(v).ok()) {
            fields.push((name, value));
        }
    }
    let mut reply = Vec::new();
    http::write_response_head(
        &mut reply,
        response.status,
        &response.reason,
        &fields,
        body,
        keep_alive,
    );
    conn.write_all(&reply).await?;
    relay_body(&mut from, response.body, &mut Writer::Agent(conn), body == BodyKind::Chunked)
        .await?;
    if poolable && whole && response.keep_alive {
        let (socket, early) = from.into_inner();
        if early.is_empty() {
            shared.peer_pool.put(holder, socket);
        }
    }
    Ok(if keep_alive { Outcome::Done } else { Outcome::Close })
}

/// Longest the holder may take to begin its answer once it has the whole
/// request: a poll's hold and then as long as any body may take to read.
fn answer_within(head: &RequestHead) -> Duration {
    match carrier::parse_path(&head.target) {
        Some((_, Verb::Poll)) => carrier::poll::poll_wait(&head.target) + BODY_TIMEOUT,
        _ => BODY_TIMEOUT,
    }
}

/// Where [`relay_body`] writes.
enum Writer<'a> {
    Agent(&'a mut HttpConn<Link>),
    Station(&'a mut TcpStream),
}

impl Writer<'_> {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Writer::Agent(conn) => conn.write_all(bytes).await,
            Writer::Station(socket) => socket.write_all(bytes).await,
        }
    }
}

/// Copies the body of `kind` that follows the head just read on `from` to
/// `to`, as it arrives: in chunks if `chunked`, else as it is (its end is
/// then its length, or the close).
async fn relay_body<S>(
    from: &mut HttpConn<S>,
    kind: BodyKind,
    to: &mut Writer<'_>,
    chunked: bool,
) -> Result<(), HttpError>
where
    S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin,
{
    let mut body = from.body(kind, None);
    let mut piece = Vec::new();
    while let Some(bytes) = body.next().await? {
        piece.clear();
        if chunked {
            http::write_chunk_header(&mut piece, bytes.len());
            piece.extend_from_slice(bytes);
            piece.extend_from_slice(CHUNK_END);
        } else {
            piece.extend_from_slice(bytes);
        }
        to.write_all(&piece).await?;
    }
    if chunked {
        to.write_all(LAST_CHUNK).await?;
    }
    Ok(())
}

/// Carries a reverse client to `holder`, the station holding its device's
/// session.
pub(super) async fn relay_exposed(shared: Arc<Shared>, client: Client, holder: SocketAddr) {
    let Client { socket, peer: client, listener, device, service } = client;
    let refused = |why: String| {
        log::warn!(
            "client {client} on {listener}: device {device} is held by station {holder}, \
             which {why}; closed the connection (service {service:?})"
        );
    };
    let upstream = match connect(holder).await {
        Ok(upstream) => upstream,
        Err(e) => return refused(format!("does not answer: {e}")),
    };
    let mut out = Vec::new();
    let client_text = client.to_string();
    let vouched = vouch(&shared, "POST", EXPOSE_PATH);
    let fields = [
        (PEER_HEADER, vouched.as_str()),
        (CLIENT_HEADER, client_text.as_str()),
        (DEVICE_HEADER, device.as_str()),
        (SERVICE_HEADER, service.as_str()),
        ("Connection", "Upgrade"),
        ("Upgrade", UPGRADE),
    ];
    http::write_request_head(
        &mut out,
        "POST",
        EXPOSE_PATH,
        &holder.to_string(),
        &fields,
        BodyKind::Empty,
    );
    let mut writer = upstream.clone();
    if let Err(e) = writer.write_all(&out).await {
        return refused(format!("failed: {e}"));
    }
    let mut from = HttpConn::new(upstream);
    let response = match from.read_response(false).await {
        Ok(response) => response,
        Err(e) => return refused(format!("failed: {e}")),
    };
    if response.status != 101 {
        return refused(format!("answered {} {}", response.status, response.reason));
    }
    log::info!(
        "client {client} on {listener} -> device {device} service {service:?} via station {holder}"
    );
    let (upstream, early) = from.into_inner();
    splice(socket, upstream, &early).await;
    log::debug!("client {client} -> device {device} via station {holder}: ended");
}

/// Copies both ways between `a` and `b` until both directions end, each
/// end passed on as a half-close; `early` goes to `a` first.
async fn splice(a: TcpStream, b: TcpStream, early: &[u8]) {
    let a_to_b = {
        let (a, mut b) = (a.clone(), b.clone());
        async move {
            let _ = io::copy(a, &mut b).await;
            let _ = b.shutdown(Shutdown::Write);
        }
    };
    let b_to_a = async move {
        let mut to_a = a.clone();
        if to_a.write_all(early).await.is_ok() {
            let _ = io::copy(b, &mut to_a).await;
        }
        let _ = to_a.shutdown(Shutdown::Write);
    };
    future::zip(a_to_b, b_to_a).await;
}

/// Serves a reverse connection another station relays: `head` asked for
/// a device's service; on 101 the connection carries the client's bytes.
pub(super) async fn serve_expose(
    shared: &Arc<Shared>,
    mut conn: HttpConn<Link>,
    head: &RequestHead,
    client: SocketAddr,
    from: SocketAddr,
) {
    let field =
        |name| head.header(name).and_then(|v| std::str::from_utf8(v).ok()).map(str::to_owned);
    let refusal = match (field(DEVICE_HEADER), field(SERVICE_HEADER)) {
        (Some(device), Some(service)) => {
            match accept_relayed(shared, &device, &service, from) {
                Ok(live) => {
                    let mut reply = Vec::new();
                    let fields = [("Connection", "Upgrade"), ("Upgrade", UPGRADE)];
                    let (status, kind) = (101, BodyKind::Empty);
                    http::write_response_head(
                        &mut reply,
                        status,
                        "Switching Protocols",
                        &fields,
                        kind,
                        true,
                    );
                    if conn.write_all(&reply).await.is_err() {
                        return;
                    }
                    let (link, early) = conn.into_inner();
                    // The other station sends the client's bytes only after our 101.
                    match link {
                        Link::Plain(socket) if early.is_empty() => {
                            let listener = format!("station {from}");
                            let client = Client { socket, peer: client, listener, device, service };
                            expose::carry(shared, &live, client);
                        }
                        _ => log::warn!("station {from}: bytes before the 101 of a relayed reverse connection; closed"),
                    }
                    return;
                }
                Err(refusal) => refusal,
            }
        }
        _ => (400, "a relayed reverse connection without device and service".to_owned()),
    };
    let (status, why) = refusal;
    refuse_log(shared, from, status, &why);
    let _ = conn.write_all(&http::error_response(status)).await;
}

/// The session a relayed reverse client for `service` of `device` goes
/// to, or the status and reason it is refused with.
fn accept_relayed(
    shared: &Shared,
    device: &str,
    service: &str,
    from: SocketAddr,
) -> Result<Arc<Live>, (u16, String)> {
    if !shared.exposes.serves(device, service) {
        return Err((
            403,
            format!(
                "station {from} relayed a client for service {service:?} of device {device}, \
                 which this station does not expose"
            ),
        ));
    }
    if shared.draining.load(std::sync::atomic::Ordering::Acquire) {
        return Err((503, "the station is stopping".to_owned()));
    }
    live_session(shared, device).ok_or_else(|| {
        (404, format!("device {device} is offline here (relayed by station {from})"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carrier::poll::{poll_query, POLL_WAIT};
    use crate::station::expose::ExposeSpec;
    use crate::station::fixture::{
        client, config, exchange, session, station, station_for, DEVICE,
    };
    use crate::station::requests::Via;

    fn head(method: &str, target: &str, fields: &str) -> RequestHead {
        let text = format!("{method} {target} HTTP/1.1\r\nHost: station\r\n{fields}\r\n");
        let (head, _) = http::parse_request(text.as_bytes()).expect("a head").expect("complete");
        head
    }

    fn vouched(value: &str, method: &str, target: &str) -> RequestHead {
        head(method, target, &format!("{PEER_HEADER}: {value}\r\n"))
    }

    fn poll_target() -> String {
        carrier::path("/", &[1; 16], Verb::Poll)
    }

    const FORGED: &str =
        "an X-Postern-Peer MAC that no key of this station made (not a station of this cluster)";
    const MALFORMED: &str = "a malformed X-Postern-Peer field";

    #[test]
    fn a_request_vouched_for_by_a_station_of_the_cluster_is_admitted_for_its_client() {
        let shared = station();
        let target = poll_target();
        let value = vouch(&shared, "POST", &target);
        assert_eq!(admit(&shared, &vouched(&value, "POST", &target), client()), Ok(client()));
        let relayed = format!("{PEER_HEADER}: {value}\r\n{CLIENT_HEADER}: 198.51.100.4:5000\r\n");
        let for_client = head("POST", &target, &relayed);
        let relayed_for = "198.51.100.4:5000".parse().unwrap();
        assert_eq!(admit(&shared, &for_client, client()), Ok(relayed_for));
        // A client field that is no address leaves the connection's own.
        let relayed = format!("{PEER_HEADER}: {value}\r\n{CLIENT_HEADER}: somewhere\r\n");
        assert_eq!(admit(&shared, &head("POST", &target, &relayed), client()), Ok(client()));
    }

    #[test]
    fn a_vouch_for_another_request_or_from_another_cluster_is_refused() {
        let shared = station();
        let target = poll_target();
        let value = vouch(&shared, "POST", &target);
        let push = carrier::path("/", &[1; 16], Verb::Push);
        assert_eq!(admit(&shared, &vouched(&value, "GET", &target), client()), Err(FORGED));
        assert_eq!(admit(&shared, &vouched(&value, "POST", &push), client()), Err(FORGED));
        let elsewhere = station();
        assert_eq!(admit(&elsewhere, &vouched(&value, "POST", &target), client()), Err(FORGED));
        // While the station's key is replaced, either key vouches.
        let next = PrivateKey::generate();
        let current = shared.keys().current.clone();
        let setting = format!("next_private_key = \"{}\"", next.to_base64());
        let rotating = station_for(&config(&current, &setting));
        let by_next = vouch_at(&next, unix_secs(), "POST", &target);
        assert_eq!(admit(&rotating, &vouched(&by_next, "POST", &target), client()), Ok(client()));
        assert_eq!(admit(&rotating, &vouched(&value, "POST", &target), client()), Ok(client()));
        assert_eq!(admit(&shared, &vouched(&by_next, "POST", &target), client()), Err(FORGED));
    }

    #[test]
    fn a_vouch_made_more_than_the_clock_skew_away_is_refused() {
        let shared = station();
        let key = shared.keys().current.clone();
        let target = poll_target();
        let now = unix_secs();
        // Two seconds inside and outside the bound: the clock may tick
        // between here and the check.
        for (secs, admitted) in [
            (now - CLOCK_SKEW + 2, true),
            (now + CLOCK_SKEW - 2, true),
            (now - CLOCK_SKEW - 2, false),
            (now + CLOCK_SKEW + 2, false),
            (0, false),
        ] {
            let value = vouch_at(&key, secs, "POST", &target);
            let got = admit(&shared, &vouched(&value, "POST", &target), client());
            let want = match admitted {
                true => Ok(client()),
                false => Err("an X-Postern-Peer time more than 60 s off (replayed, or the stations' clocks differ)"),
            };
            assert_eq!(got, want, "{secs} at {now}");
        }
    }

    #[test]
    fn a_missing_or_malformed_vouch_is_refused_with_what_is_wrong() {
        let shared = station();
        let target = poll_target();
        assert_eq!(
            admit(&shared, &head("POST", &target, ""), client()),
            Err("no X-Postern-Peer field")
        );
        let now = unix_secs();
        for value in [
            "".to_owned(),
            "12345".to_owned(),
            format!("{now}"),
            format!("-{now} 00"),
            format!("{now} 0"),
            format!("{now} zz"),
            format!("{now} 0g"),
        ] {
            let got = admit(&shared, &vouched(&value, "POST", &target), client());
            assert_eq!(got, Err(MALFORMED), "{value:?}");
        }
        // Well-formed, but no MAC of ours: one of the wrong length, or none.
        for value in [format!("{now} 00ff"), format!("{now} {}", "00".repeat(32))] {
            let got = admit(&shared, &vouched(&value, "POST", &target), client());
            assert_eq!(got, Err(FORGED), "{value:?}");
        }
        // Values the HTTP parser would not pass on as they are.
        let raw = |value: Vec<u8>| {
            let mut head = head("POST", &target, "");
            head.headers.push((PEER_HEADER.to_owned(), value));
            admit(&shared, &head, client())
        };
        assert_eq!(raw(format!("{now} ").into_bytes()), Err(FORGED));
        assert_eq!(raw(b"\xff\xfe 00".to_vec()), Err(MALFORMED));
    }

    #[test]
    fn the_holder_has_a_polls_hold_more_than_other_requests_to_answer() {
        let poll = |query: &str| head("POST", &format!("{}?{query}", poll_target()), "");
        assert_eq!(answer_within(&poll("w=50")), Duration::from_secs(50) + BODY_TIMEOUT);
        let asked = poll_query(Duration::from_secs(5), true);
        assert_eq!(answer_within(&poll(&asked)), Duration::from_secs(5) + BODY_TIMEOUT);
        assert_eq!(answer_within(&head("POST", &poll_target(), "")), POLL_WAIT + BODY_TIMEOUT);
        let push = carrier::path("/", &[1; 16], Verb::Push);
        assert_eq!(answer_within(&head("POST", &push, "")), BODY_TIMEOUT);
        assert_eq!(answer_within(&head("POST", "/", "")), BODY_TIMEOUT);
    }

    /// The peer listener serves only what another station vouched for,
    /// and serves it as its own listener would.
    #[test]
    fn the_peer_listener_refuses_the_unvouched_and_serves_the_vouched() {
        let shared = station();
        let target = carrier::path("/", &[1; 16], Verb::Down);
        let plain = format!("POST {target} HTTP/1.1\r\nHost: station\r\nContent-Length: 0\r\n\r\n");
        let answer = exchange(&shared, Via::Peer, plain.as_bytes());
        assert_eq!(answer, http::error_response(403));
        let value = vouch(&shared, "POST", &target);
        let request = format!(
            "POST {target} HTTP/1.1\r\nHost: station\r\n{PEER_HEADER}: {value}\r\nContent-Length: 0\r\n\r\n"
        );
        let answer = exchange(&shared, Via::Peer, request.as_bytes());
        assert_eq!(answer, http::error_response(410));
    }

    fn relayed_expose(shared: &Shared, fields: &str) -> Vec<u8> {
        let value = vouch(shared, "POST", EXPOSE_PATH);
        format!(
            "POST {EXPOSE_PATH} HTTP/1.1\r\nHost: station\r\n{PEER_HEADER}: {value}\r\n{fields}\
             Connection: Upgrade\r\nUpgrade: {UPGRADE}\r\n\r\n"
        )
        .into_bytes()
    }

    /// A relayed reverse client gets only what this station would let in
    /// itself; each refusal is its own status.
    #[test]
    fn a_relayed_reverse_client_is_refused_what_the_station_does_not_serve() {
        let shared = station();
        let fields = format!("{DEVICE_HEADER}: {DEVICE}\r\n{SERVICE_HEADER}: modbus\r\n");
        let answer = exchange(&shared, Via::Peer, &relayed_expose(&shared, ""));
        assert_eq!(answer, http::error_response(400));
        let answer = exchange(&shared, Via::Peer, &relayed_expose(&shared, &fields));
        assert_eq!(answer, http::error_response(403));

        let spec = ExposeSpec {
            addr: "127.0.0.1:15020".parse().unwrap(),
            device_name: DEVICE.to_owned(),
            service: "modbus".to_owned(),
        };
        shared.exposes.pretend(spec);
        assert_eq!(
            accept_relayed(&shared, DEVICE, "console", client()).map(drop).unwrap_err().0,
            403
        );
        let offline = accept_relayed(&shared, DEVICE, "modbus", client()).map(drop);
        let why = format!("device {DEVICE} is offline here (relayed by station {})", client());
        assert_eq!(offline, Err((404, why)));
        let answer = exchange(&shared, Via::Peer, &relayed_expose(&shared, &fields));
        assert_eq!(answer, http::error_response(404));

        let (_, live, _) = session(&shared);
        let found = accept_relayed(&shared, DEVICE, "modbus", client()).expect("served here");
        assert!(Arc::ptr_eq(&found, &live));
        shared.draining.store(true, std::sync::atomic::Ordering::Release);
        let stopping = accept_relayed(&shared, DEVICE, "modbus", client()).map(drop);
        assert_eq!(stopping, Err((503, "the station is stopping".to_owned())));
    }
}
