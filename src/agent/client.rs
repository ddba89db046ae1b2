//! How the agent reaches the station: a TCP connection straight to it or to
//! a forward proxy, carrier request heads, and what a reply means.
//!
//! ```text
//!  connect() ─▶ station host:port            (direct)
//!            └▶ proxy host:port ─ POST http://station/prefix/p1/… (absolute form, no CONNECT)
//!  head()    ─▶ request head + Cookie (kept for sticky load balancers) + Proxy-Authorization
//!  check()   ─▶ 200, or an error that says who answered: the station (it marks its
//!               replies) or something on the path (proxy, load balancer)
//! ```
//!
//! Not here: lanes and their loops (`lanes`), sessions (`mod.rs`).

use std::sync::Mutex;
use std::time::Duration;

use super::egress::{Egress, EgressError};
use crate::carrier::conn::HttpConn;
use crate::carrier::http::{self, BodyKind, HttpError, ResponseHead};
use crate::carrier::link::Link;
use crate::carrier::{self, Verb, STATION_MARK};
use crate::config::{AgentTls, ProxyUrl, StationUrl};
use crate::connect::{connect, ConnectError, CONNECT_TIMEOUT};
use crate::crypto::{self, SessionId};

/// Time for a reply to a request that the station answers at once.
pub(super) const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Request bodies up to this size are copied behind the head and written
/// with it; larger ones are written on their own.
const INLINE_BODY: usize = 16 * 1024;

/// Cookies kept for a load balancer's stickiness. Balancers set one or two;
/// the bound keeps a misbehaving middlebox from growing our requests.
const MAX_COOKIES: usize = 8;

/// Longest `name=value` kept; longer cookies are not stickiness cookies.
const MAX_COOKIE_BYTES: usize = 512;

/// Reconnect delays: a step doubling from the first, each delay the step
/// scaled by a random factor in [0.5, 1.5) so a fleet does not return in
/// step; the step stops at two thirds of the last, so no delay reaches it.
pub(super) const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_LAST: Duration = Duration::from_secs(30);

/// Why one carrier request failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum CarrierError {
    #[error("cannot connect to {what} {addr}: {source}")]
    Connect { what: &'static str, addr: String, source: std::io::Error },
    #[error("connecting to {what} {addr} timed out")]
    ConnectTimeout { what: &'static str, addr: String },
    #[error("no random numbers from the operating system: {0}")]
    Random(getrandom::Error),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("{0} requires authentication (407): set user:pass in `proxy`")]
    ProxyAuth(String),
    #[error("the station refused our key {0} (403): add it to the station's [[devices]]")]
    KeyRefused(String),
    /// The station sees another agent with this device's key.
    #[error(
        "the station refused our handshake (409): another agent uses this device's key {0} \
         (a cloned device image?); give each device its own key (postern genkey)"
    )]
    KeyInUse(String),
    /// The station could not read a handshake made for any pinned key.
    #[error(
        "the station could not decrypt our handshake (400): station_public_key ({0}) is \
         probably not this station's key; `postern pubkey < KEY` on the station prints the right one"
    )]
    StationKeyWrong(String),
    /// The station rations handshakes (a fleet returning at once) and
    /// said when to come back.
    #[error("the station is busy with other devices (503); it asked us to come back in {} s", .0.as_secs())]
    Busy(Duration),
    /// A non-200 reply. `who` says whether the station itself answered.
    #[error("{who} answered {status} {reason}")]
    Status { who: Who, status: u16, reason: String },
    #[error("the station does not know this session (it restarted or timed it out)")]
    SessionGone,
    #[error("the station's handshake reply did not verify: {0}")]
    Handshake(crypto::CryptoError),
    #[error("the reply was not the station's sealed packets ({0}): changed on the way?")]
    BadBody(crate::tunnel::BadBody),
    /// TLS, CONNECT or proxy authentication (agent/egress.rs).
    #[error(transparent)]
    Egress(EgressError),
}

/// Who answered a carrier request: the station marks its replies
/// (`X-Postern: station`), so a proxy's or a balancer's page is told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Who {
    Station,
    /// The forward proxy the agent goes through.
    Proxy,
    /// Without a proxy: a reverse proxy or balancer before the station.
    InFront,
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Who::Station => "the station",
            Who::Proxy => "the proxy (not the station)",
            Who::InFront => "something in front of the station (not the station itself)",
        })
    }
}

/// How sending a request on a connection failed.
enum Stale {
    /// The connection was closed before any byte of an answer: on a
    /// kept-alive connection, the peer let it expire while it sat idle.
    Closed,
    Failed(CarrierError),
}

impl Stale {
    /// On a fresh connection, a close is an error like any other.
    fn into_error(self) -> CarrierError {
        match self {
            Stale::Closed => HttpError::UnexpectedEof.into(),
            Stale::Failed(e) => e,
        }
    }
}

/// Exponential backoff with jitter.
pub(super) struct Backoff {
    next: Duration,
    first: Duration,
    last: Duration,
    rng: u64,
}

impl Backoff {
    pub(super) fn new() -> Self {
        Self::between(BACKOFF_FIRST, BACKOFF_LAST)
    }

    /// Delays from about `first` growing to under `last`.
    pub(super) fn between(first: Duration, last: Duration) -> Self {
        let mut seed = [0u8; 8];
        // Without OS randomness the jitter is merely less random.
        let _ = getrandom::fill(&mut seed);
        Backoff { next: first, first, last, rng: u64::from_le_bytes(seed) | 1 }
    }

    pub(super) fn reset(&mut self) {
        self.next = self.first;
    }

    pub(super) fn delay(&mut self) -> Duration {
        let delay = self.next.mul_f64(0.5 + self.jitter());
        // The step stops where the largest factor meets the last delay (a
        // step of the last itself made delays of up to 45 s).
        self.next = (self.next * 2).min(self.last * 2 / 3);
        delay
    }

    /// `wait` and up to a fifth more, the next delay left as it is: what a
    /// station that asked for `wait` gets. Never sooner: the station gave
    /// this agent a slot then (admission.rs), and one that came early would
    /// be refused again and sent to the end of the queue.
    pub(super) fn after(&mut self, wait: Duration) -> Duration {
        wait.mul_f64(1.0 + self.jitter() / 5.0)
    }

    /// A fraction in [0, 1).
    fn jitter(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % 1000) as f64 / 1000.0
    }
}

/// Longest `Retry-After` the agent follows (a station asks for at most 120 s).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// A reply's `Retry-After` in delta seconds (a date is not followed), at
/// most [`MAX_RETRY_AFTER`].
fn retry_after(head: &ResponseHead) -> Option<Duration> {
    let text = std::str::from_utf8(head.header("Retry-After")?).ok()?;
    let secs: u64 = text.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// Races `work` against a deadline.
pub(super) async fn deadline<T>(
    limit: Duration,
    work: impl std::future::Future<Output = Result<T, CarrierError>>,
) -> Result<T, CarrierError> {
    crate::task::within(limit, || CarrierError::Http(HttpError::Timeout), work).await
}

/// How to reach the station: directly or through a forward proxy.
pub(super) struct Client {
    station: StationUrl,
    proxy: Option<ProxyUrl>,
    /// TLS, CONNECT and proxy authentication.
    egress: Egress,
    /// `name=value` pairs from `Set-Cookie`, sent back on every request so
    /// a cookie-sticky load balancer keeps us on one station.
    cookies: Mutex<Vec<String>>,
}

impl Client {
    pub(super) fn new(station: StationUrl, proxy: Option<ProxyUrl>, tls: &AgentTls) -> Self {
        let egress = Egress::new(station.clone(), proxy.clone(), tls);
        Client { station, proxy, egress, cookies: Mutex::new(Vec::new()) }
    }

    /// Where requests go, for log lines.
    pub(super) fn describe(&self) -> String {
        match &self.proxy {
            Some(p) => format!("proxy {}:{}", p.host, p.port),
            None => format!("station {}", self.station.authority()),
        }
    }

    pub(super) async fn connect(&self) -> Result<HttpConn<Link>, CarrierError> {
        let (what, host, port) = match &self.proxy {
            Some(p) => ("proxy", p.host.as_str(), p.port),
            None => ("station", self.station.host.as_str(), self.station.port),
        };
        let addr = format!("{host}:{port}");
        let socket = connect((host, port), CONNECT_TIMEOUT).await.map_err(|e| match e {
            ConnectError::Failed(source) => CarrierError::Connect { what, addr, source },
            ConnectError::NoAnswer(_) => CarrierError::ConnectTimeout { what, addr },
        })?;
        self.egress.over(socket).await
    }

    /// The path of a carrier request, with `query` (without `?`) if any.
    pub(super) fn path(&self, session: &SessionId, verb: Verb, query: Option<&str>) -> String {
        let mut path = carrier::path(&self.station.path_prefix, session, verb);
        if let Some(query) = query {
            path.push('?');
            path.push_str(query);
        }
        path
    }

    /// Appends the head of a carrier request for `path`.
    pub(super) fn head(&self, out: &mut Vec<u8>, path: &str, body: BodyKind) {
        let authority = self.station.authority();
        let target = match self.egress.absolute_form() {
            true => format!("http://{authority}{path}"),
            false => path.to_owned(),
        };
        let cookie = lock(&self.cookies).join("; ");
        let mut headers = vec![("Content-Type", "application/octet-stream")];
        if !cookie.is_empty() {
            headers.push(("Cookie", cookie.as_str()));
        }
        let proxy_auth = self.egress.request_authorization();
        if let Some(auth) = &proxy_auth {
            headers.push(("Proxy-Authorization", auth.as_str()));
        }
        http::write_request_head(out, "POST", &target, &authority, &headers, body);
    }

    /// Keeps the reply's cookies, then turns a non-200 reply into the error
    /// a user can act on.
    pub(super) fn check(&self, head: &ResponseHead) -> Result<(), CarrierError> {
        self.keep_cookies(head);
        let from_station =
            head.header(STATION_MARK.0).is_some_and(|v| v == STATION_MARK.1.as_bytes());
        let who = match (from_station, &self.proxy) {
            (true, _) => Who::Station,
            (false, Some(_)) => Who::Proxy,
            (false, None) => Who::InFront,
        };
        match head.status {
            200 => Ok(()),
            // The station marks its 410, and a box in front may strip the
            // mark (header rewriting, nginx's proxy_hide_header). A proxy
            // has no session of ours to lose: an unmarked 410 is taken for
            // the station's too. A new session costs one handshake; waiting
            // for the old one to time out would cost session_timeout.
            410 => {
                if !from_station {
                    log::warn!(
                        "{who} answered 410 Gone without the station's X-Postern mark (stripped \
                         on the way?); taking it as the station's: starting a new session"
                    );
                }
                Err(CarrierError::SessionGone)
            }
            503 if from_station && retry_after(head).is_some() => {
                Err(CarrierError::Busy(retry_after(head).unwrap_or_default()))
            }
            407 => Err(self.egress.request_refused(head)),
            status => Err(CarrierError::Status { who, status, reason: head.reason.clone() }),
        }
    }

    fn keep_cookies(&self, head: &ResponseHead) {
        let mut jar = lock(&self.cookies);
        for value in head.headers_all("set-cookie") {
            let Ok(text) = std::str::from_utf8(value) else { continue };
            let pair = text.split(';').next().unwrap_or("").trim();
            let Some((name, _)) = pair.split_once('=') else { continue };
            if name.is_empty() || pair.len() > MAX_COOKIE_BYTES || pair.contains(['\r', '\n']) {
                continue;
            }
            let prefix = format!("{name}=");
            jar.retain(|kept| !kept.starts_with(&prefix));
            if jar.len() < MAX_COOKIES {
                jar.push(pair.to_owned());
            }
        }
    }

    /// Sends one request with a bounded body, on `conn` if it is still
    /// open, else on a new connection, which is kept for the next request
    /// when the reply allows. The reply's body goes to `deliver` run by run
    /// as it arrives: the tunnel opens records while the rest of a long
    /// poll reply is still on the wire, and no copy of the whole body is
    /// made. `deliver` is a trait object, not a generic: one copy of this
    /// state machine serves the handshake and both poll lanes (5.5 KiB of
    /// the armv7 agent).
    pub(super) async fn exchange(
        &self,
        conn: &mut Option<HttpConn<Link>>,
        path: &str,
        body: &[u8],
        wait: Duration,
        max_reply: u64,
        deliver: &mut (dyn FnMut(&[u8]) -> Result<(), CarrierError> + Send),
    ) -> Result<(), CarrierError> {
        // A small body rides in the head's write (one segment); a large one
        // (a push) is written from where it is rather than copied: eight
        // pushes in flight would hold two copies of 512 KiB each.
        let mut out = Vec::with_capacity(512 + body.len().min(INLINE_BODY));
        self.head(&mut out, path, BodyKind::Length(body.len() as u64));
        let body = if body.len() <= INLINE_BODY {
            out.extend_from_slice(body);
            &[][..]
        } else {
            body
        };
        let request = [out.as_slice(), body];
        let (mut live, head) = match conn.take() {
            Some(mut reused) => {
                match self.send(&mut reused, &request, wait).await {
                    Ok(head) if head.status != 408 => (reused, head),
                    // The box (or the station) closed the connection while it
                    // sat idle, before any byte of an answer: the request was
                    // never served, so it goes again at once on a fresh
                    // connection, as HTTP clients do. Not an error to back off from.
                    Ok(_) | Err(Stale::Closed) => {
                        log::debug!("{path}: kept-alive connection was closed while idle; sending on a new one");
                        let mut fresh = self.connect().await?;
                        let head = self
                            .send(&mut fresh, &request, wait)
                            .await
                            .map_err(Stale::into_error)?;
                        (fresh, head)
                    }
                    Err(Stale::Failed(e)) => return Err(e),
                }
            }
            None => {
                let mut fresh = self.connect().await?;
                let head =
                    self.send(&mut fresh, &request, wait).await.map_err(Stale::into_error)?;
                (fresh, head)
            }
        };
        self.check(&head)?;
        let reading = async {
            let mut reply = live.body(head.body, Some(max_reply));
            while let Some(bytes) = reply.next().await? {
                deliver(bytes)?;
            }
            Ok(())
        };
        deadline(REPLY_TIMEOUT, reading).await?;
        if head.keep_alive {
            *conn = Some(live);
        }
        Ok(())
    }

    /// Writes a whole request, given in parts, and reads the head of its answer.
    async fn send(
        &self,
        live: &mut HttpConn<Link>,
        request: &[&[u8]],
        wait: Duration,
    ) -> Result<ResponseHead, Stale> {
        let closed = |e: &std::io::Error| {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
            matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted)
        };
        for part in request.iter().filter(|part| !part.is_empty()) {
            live.write_all(part).await.map_err(|e| {
                if closed(&e) {
                    Stale::Closed
                } else {
                    Stale::Failed(HttpError::Io(e).into())
                }
            })?;
        }
        match deadline(wait, async { live.read_response(false).await.map_err(Into::into) }).await {
            Ok(head) => Ok(head),
            Err(CarrierError::Http(HttpError::UnexpectedEof)) if !live.has_buffered() => {
                Err(Stale::Closed)
            }
            Err(CarrierError::Http(HttpError::Io(e))) if closed(&e) && !live.has_buffered() => {
                Err(Stale::Closed)
            }
            Err(e) => Err(Stale::Failed(e)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(proxy: Option<ProxyUrl>) -> Client {
        let station = StationUrl {
            https: false,
            host: "st".into(),
            port: 8080,
            path_prefix: "/tunnel/".into(),
        };
        Client::new(station, proxy, &AgentTls::default())
    }

    fn response(text: &str) -> ResponseHead {
        http::parse_response(text.as_bytes(), false).unwrap().unwrap().0
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_a_fleet_spreads_out() {
        let mut one = Backoff::new();
        let delays: Vec<Duration> = (0..12).map(|_| one.delay()).collect();
        assert!(delays[0] >= BACKOFF_FIRST / 2 && delays[0] < BACKOFF_FIRST * 3 / 2);
        assert!(delays.iter().all(|d| *d < BACKOFF_LAST), "{delays:?}");
        assert!(delays[11] >= BACKOFF_LAST / 3, "{delays:?}");
        // Still jittered at the cap: a fleet must not retry in step.
        let capped: Vec<Duration> = (0..50).map(|_| one.delay()).collect();
        assert!(capped.iter().all(|d| *d < BACKOFF_LAST), "{capped:?}");
        assert!(capped.iter().any(|d| *d != capped[0]), "{capped:?}");
        one.reset();
        assert!(one.delay() < BACKOFF_FIRST * 3 / 2);
        // A thousand devices that lost the station at once come back over
        // the whole jitter range, not in one instant: no 10 ms slot holds
        // more than a few percent of them.
        let mut slots = [0u32; 100];
        for _ in 0..1000 {
            let first = Backoff::new().delay();
            slots[(first.as_millis() / 10).min(99) as usize] += 1;
        }
        let busiest = slots.iter().max().copied().unwrap_or(0);
        assert!(busiest < 50, "{busiest} of 1000 devices in one 10 ms slot");
        // The first delay spans 0.25 s to 0.75 s: fifty 10 ms slots.
        assert!(slots.iter().filter(|n| **n > 0).count() >= 45, "{slots:?}");
    }

    #[test]
    fn cookies_are_kept_replaced_and_sent_back() {
        let c = client(None);
        c.check(&response(
            "HTTP/1.1 200 OK\r\nSet-Cookie: SRV=s1; Path=/\r\nSet-Cookie: other=x\r\nContent-Length: 0\r\n\r\n",
        ))
        .unwrap();
        c.check(&response("HTTP/1.1 200 OK\r\nSet-Cookie: SRV=s2\r\nContent-Length: 0\r\n\r\n"))
            .unwrap();
        let mut out = Vec::new();
        c.head(&mut out, "/tunnel/x", BodyKind::Empty);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\r\nCookie: other=x; SRV=s2\r\n"), "{text}");
        assert!(text.starts_with("POST /tunnel/x HTTP/1.1\r\nHost: st:8080\r\n"), "{text}");
    }

    #[test]
    fn cookie_jar_is_bounded() {
        let c = client(None);
        let mut text = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..20 {
            text.push_str(&format!("Set-Cookie: c{i}=v\r\n"));
        }
        text.push_str(&format!("Set-Cookie: big={}\r\n\r\n", "x".repeat(600)));
        c.check(&response(&text)).unwrap();
        assert_eq!(lock(&c.cookies).len(), MAX_COOKIES);
    }

    #[test]
    fn proxy_requests_are_absolute_and_authorized() {
        let proxy =
            ProxyUrl { host: "px".into(), port: 3128, auth: Some(("u".into(), "p".into())) };
        let c = client(Some(proxy));
        let mut out = Vec::new();
        c.head(&mut out, "/tunnel/x", BodyKind::Length(3));
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("POST http://st:8080/tunnel/x HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("\r\nProxy-Authorization: Basic dTpw\r\n"), "{text}");
    }

    #[test]
    fn replies_say_who_answered() {
        let c = client(None);
        let gone = "HTTP/1.1 410 Gone\r\nX-Postern: station\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(c.check(&response(gone)), Err(CarrierError::SessionGone)));
        // Its mark stripped on the way, the station's 410 still ends the session.
        let stripped = "HTTP/1.1 410 Gone\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(c.check(&response(stripped)), Err(CarrierError::SessionGone)));
        // The station's own 404 means a wrong or garbled path, not a lost session.
        let station_404 =
            "HTTP/1.1 404 Not Found\r\nX-Postern: station\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            c.check(&response(station_404)).unwrap_err().to_string(),
            "the station answered 404 Not Found"
        );
        let other_404 = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            c.check(&response(other_404)).unwrap_err().to_string(),
            "something in front of the station (not the station itself) answered 404 Not Found"
        );
        let proxied = client(Some(ProxyUrl { host: "px".into(), port: 3128, auth: None }));
        let page = "HTTP/1.1 503 Service Unavailable\r\nServer: squid\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            proxied.check(&response(page)).unwrap_err().to_string(),
            "the proxy (not the station) answered 503 Service Unavailable"
        );
        let auth = "HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            proxied.check(&response(auth)).unwrap_err().to_string(),
            "proxy px:3128 requires authentication (407): set user:pass in `proxy`"
        );
        // The station's own 503 with a wait is followed; a proxy's is not
        // (it cannot tell us when the station will have room).
        let busy = String::from_utf8(http::busy_response(37)).expect("text");
        assert_eq!(
            c.check(&response(&busy)).unwrap_err().to_string(),
            "the station is busy with other devices (503); it asked us to come back in 37 s"
        );
        let from_proxy =
            "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(
            proxied.check(&response(from_proxy)),
            Err(CarrierError::Status { status: 503, .. })
        ));
        let long = busy.replace("Retry-After: 37", "Retry-After: 99999");
        assert!(matches!(
            c.check(&response(&long)),
            Err(CarrierError::Busy(wait)) if wait == MAX_RETRY_AFTER
        ));
    }
}
