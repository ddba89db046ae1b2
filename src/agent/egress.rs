//! The way out of the device's network, after the TCP connection: what a
//! browser does on the same network.
//!
//! ```text
//!  station  proxy  on the TCP connection (to the proxy, or the station)
//!  http://  none   nothing
//!  http://  yes    NTLM: OPTIONS http://station/… Max-Forwards: 0 to authenticate the
//!                  connection, which then carries absolute-form requests; Basic goes
//!                  on every request instead (Client::head). Never CONNECT.
//!  https:// none   TLS to the station
//!  https:// yes    CONNECT host:port (+ Basic or NTLM), then TLS inside the tunnel
//! ```
//!
//! The scheme comes from the proxy's `Proxy-Authenticate` offers: Basic is
//! sent unasked when credentials are given (as before), and a 407 that
//! offers NTLM switches this agent to NTLM for good. Each connection runs
//! at most [`MAX_AUTH_ROUNDS`] rounds; refused credentials are an error
//! for the caller's backoff, never a loop.
//!
//! Not here: the TCP connection and its deadline (`client`), TLS itself
//! (`carrier::tls`), the header values (`proxy_auth`).

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use smol::net::TcpStream;

use super::client::{deadline, CarrierError, REPLY_TIMEOUT};
use super::proxy_auth::{self, Credentials, NtlmError, Scheme};
use crate::carrier::conn::HttpConn;
use crate::carrier::http::{BodyKind, HttpError, ResponseHead};
use crate::carrier::link::Link;
#[cfg(feature = "tls")]
use crate::carrier::tls::{ClientTls, TlsError};
use crate::config::{AgentTls, ProxyUrl, StationUrl};

/// Requests one connection may spend authenticating: NTLM needs two, one
/// more lets a proxy that refused unasked Basic offer NTLM (or Negotiate)
/// instead.
const MAX_AUTH_ROUNDS: usize = 3;

/// The workstation name NTLM sends: proxies log it; some refuse an empty one.
const WORKSTATION: &str = "POSTERN";

/// What this build can answer a 407 with.
const SCHEMES: &str = if cfg!(feature = "ntlm") {
    "postern speaks NTLM, Negotiate (with NTLM inside, no Kerberos) and Basic"
} else {
    "this build of postern speaks Basic only (NTLM and Negotiate are cargo feature `ntlm`)"
};

/// Largest 407 or error page read (and thrown away) to keep the connection.
const MAX_PROXY_PAGE: u64 = 64 * 1024;

/// Why the way out failed, before any request reached the station.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(super) enum EgressError {
    #[error("the proxy {proxy} refused CONNECT to {target}: {status} {reason}")]
    ConnectRefused { proxy: String, target: String, status: u16, reason: String },
    #[error("the proxy {proxy} refused our {scheme} credentials (407): check the user and password in `proxy`")]
    CredentialsRefused { proxy: String, scheme: &'static str },
    #[error("the proxy {proxy} requires authentication (407, offers {offers}): set user:pass in `proxy`")]
    CredentialsNeeded { proxy: String, offers: String },
    #[error("the proxy {proxy} offers only {offers} authentication; {SCHEMES}")]
    SchemeUnsupported { proxy: String, offers: String },
    #[error("the proxy {proxy} closed the connection in the middle of {scheme} authentication")]
    ClosedDuringAuth { proxy: String, scheme: &'static str },
    #[error("the proxy {proxy} asks for {scheme} authentication; the next connection uses it")]
    SwitchingScheme { proxy: String, scheme: &'static str },
    #[error("the proxy {proxy} asked again for authentication on a connection {scheme} had authenticated (does it refuse TRACE, which postern authenticates with?)")]
    NotKept { proxy: String, scheme: &'static str },
    #[error("the proxy {0} sent bytes after its answer to CONNECT, before TLS began")]
    BytesAfterConnect(String),
    #[error(transparent)]
    Ntlm(#[from] NtlmError),
    #[cfg(feature = "tls")]
    #[error("TLS with the station {station}: {source}")]
    Tls { station: String, source: TlsError },
    #[error("TLS is not set up: {0}")]
    TlsSetup(String),
}

/// The agent's way out: proxy authentication state and TLS settings.
pub(super) struct Egress {
    station: StationUrl,
    proxy: Option<ProxyUrl>,
    credentials: Option<Credentials>,
    /// The scheme to start with: Basic while no proxy asked otherwise.
    scheme: Mutex<Scheme>,
    #[cfg(feature = "tls")]
    tls: Option<Result<ClientTls, String>>,
}

impl Egress {
    pub(super) fn new(station: StationUrl, proxy: Option<ProxyUrl>, tls: &AgentTls) -> Egress {
        let credentials =
            proxy.as_ref().and_then(|p| p.auth.as_ref()).map(|(u, p)| Credentials::new(u, p));
        #[cfg(feature = "tls")]
        let tls = station
            .https
            .then(|| ClientTls::new(tls.ca_file.as_deref(), &tls.pins).map_err(|e| e.to_string()));
        #[cfg(not(feature = "tls"))]
        let _ = tls;
        Egress {
            station,
            proxy,
            credentials,
            scheme: Mutex::new(Scheme::Basic),
            #[cfg(feature = "tls")]
            tls,
        }
    }

    /// Requests name the station in absolute form: a proxy that is not
    /// CONNECTed through (an http:// station).
    #[must_use]
    pub(super) fn absolute_form(&self) -> bool {
        self.proxy.is_some() && !self.station.https
    }

    /// The `Proxy-Authorization` every request carries, if any: Basic to a
    /// proxy that sees the requests. NTLM authenticated the connection
    /// instead, and CONNECT hides the requests from the proxy.
    #[must_use]
    pub(super) fn request_authorization(&self) -> Option<String> {
        let creds = self.credentials.as_ref()?;
        (self.absolute_form() && *lock(&self.scheme) == Scheme::Basic).then(|| creds.basic())
    }

    /// A 407 answered a request: learns the scheme the proxy offers (NTLM
    /// or Negotiate then authenticates the next connection) and says what
    /// went wrong.
    pub(super) fn request_refused(&self, head: &ResponseHead) -> CarrierError {
        if self.credentials.is_none() {
            return CarrierError::ProxyAuth(format!("proxy {}", self.proxy_text()));
        }
        let scheme = *lock(&self.scheme);
        if scheme.per_connection() {
            return EgressError::NotKept { proxy: self.proxy_text(), scheme: scheme.name() }.into();
        }
        match self.learn(head, Some(Scheme::Basic)) {
            Ok(scheme) => {
                EgressError::SwitchingScheme { proxy: self.proxy_text(), scheme: scheme.name() }
                    .into()
            }
            Err(e) => e.into(),
        }
    }

    /// What to do after the proxy refused `sent` (None: no credentials sent).
    fn learn(&self, head: &ResponseHead, sent: Option<Scheme>) -> Result<Scheme, EgressError> {
        let proxy = self.proxy_text();
        let offers = || head.headers_all("proxy-authenticate");
        let Some(offered) = proxy_auth::choose(offers()) else {
            return Err(EgressError::SchemeUnsupported {
                proxy,
                offers: proxy_auth::offers_text(offers()),
            });
        };
        if self.credentials.is_none() {
            return Err(EgressError::CredentialsNeeded {
                proxy,
                offers: proxy_auth::offers_text(offers()),
            });
        }
        match (sent, offered) {
            (Some(Scheme::Basic), Scheme::Ntlm | Scheme::Negotiate) | (None, _) => {
                *lock(&self.scheme) = offered;
                Ok(offered)
            }
            (Some(sent), _) => Err(EgressError::CredentialsRefused { proxy, scheme: sent.name() }),
        }
    }

    fn proxy_text(&self) -> String {
        self.proxy.as_ref().map_or_else(String::new, |p| format!("{}:{}", p.host, p.port))
    }

    /// Everything between the TCP connection (to the proxy when there is
    /// one) and the first carrier request.
    pub(super) async fn over(&self, tcp: TcpStream) -> Result<HttpConn<Link>, CarrierError> {
        let tcp = match (&self.proxy, self.station.https) {
            (None, _) => tcp,
            (Some(_), true) => self.tunnel(tcp).await?,
            (Some(_), false) if lock(&self.scheme).per_connection() => self.probe(tcp).await?,
            (Some(_), false) => tcp,
        };
        if !self.station.https {
            return Ok(HttpConn::new(Link::Plain(tcp)));
        }
        self.tls(tcp).await
    }

    #[cfg(feature = "tls")]
    async fn tls(&self, tcp: TcpStream) -> Result<HttpConn<Link>, CarrierError> {
        let tls = match &self.tls {
            Some(Ok(tls)) => tls,
            Some(Err(e)) => return Err(EgressError::TlsSetup(e.clone()).into()),
            None => return Err(EgressError::TlsSetup("no TLS settings".into()).into()),
        };
        let handshake = async {
            tls.connect(&self.station.host, tcp, self.proxy.is_some()).await.map_err(|source| {
                CarrierError::from(EgressError::Tls { station: self.station.authority(), source })
            })
        };
        Ok(HttpConn::new(deadline(REPLY_TIMEOUT, handshake).await?))
    }

    #[cfg(not(feature = "tls"))]
    async fn tls(&self, _tcp: TcpStream) -> Result<HttpConn<Link>, CarrierError> {
        Err(EgressError::TlsSetup("this build has no TLS (cargo feature `tls`)".into()).into())
    }

    /// `CONNECT host:port` through the proxy, authenticating as it asks.
    async fn tunnel(&self, tcp: TcpStream) -> Result<TcpStream, CarrierError> {
        let target = format!("{}:{}", bracketed(&self.station.host), self.station.port);
        let request = |auth: Option<&str>| {
            let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
            push_auth(&mut head, auth);
            head.push_str("\r\n");
            head
        };
        let (head, tcp) = self.authenticate(tcp, &request, true).await?;
        if !(200..300).contains(&head.status) {
            return Err(EgressError::ConnectRefused {
                proxy: self.proxy_text(),
                target,
                status: head.status,
                reason: head.reason,
            }
            .into());
        }
        Ok(tcp)
    }

    /// Authenticates the connection with NTLM (or Negotiate) by a request the proxy
    /// answers itself (`OPTIONS` with `Max-Forwards: 0`, RFC 9110 7.6.2), so
    /// the station never sees it.
    async fn probe(&self, tcp: TcpStream) -> Result<TcpStream, CarrierError> {
        let authority = self.station.authority();
        let url = format!("http://{authority}{}", self.station.path_prefix);
        let request = |auth: Option<&str>| {
            let mut head =
                format!("TRACE {url} HTTP/1.1\r\nHost: {authority}\r\nMax-Forwards: 0\r\n");
            push_auth(&mut head, auth);
            head.push_str("\r\n");
            head
        };
        let (head, tcp) = self.authenticate(tcp, &request, false).await?;
        if !head.keep_alive {
            let scheme = lock(&self.scheme).name();
            return Err(EgressError::ClosedDuringAuth { proxy: self.proxy_text(), scheme }.into());
        }
        Ok(tcp)
    }

    /// Sends `request` until the proxy answers something other than 407,
    /// at most [`MAX_AUTH_ROUNDS`] times; returns that answer (its body
    /// read, for the connection to go on) and the connection.
    async fn authenticate(
        &self,
        tcp: TcpStream,
        request: &(dyn Fn(Option<&str>) -> String + Sync),
        connect: bool,
    ) -> Result<(ResponseHead, TcpStream), CarrierError> {
        let mut conn = HttpConn::new(tcp);
        let mut sending = self.credentials.as_ref().map(|_| Step::first(*lock(&self.scheme)));
        for _ in 0..MAX_AUTH_ROUNDS {
            let header = match (&sending, &self.credentials) {
                (Some(Step::Basic), Some(creds)) => Some(creds.basic()),
                (Some(Step::NtlmNegotiate(scheme)), _) => {
                    Some(format!("{} {}", scheme.name(), proxy_auth::ntlm_negotiate()))
                }
                (Some(Step::NtlmAuthenticate(scheme, token)), _) => {
                    Some(format!("{} {token}", scheme.name()))
                }
                _ => None,
            };
            conn.write_all(request(header.as_deref()).as_bytes()).await.map_err(HttpError::Io)?;
            let head = deadline(REPLY_TIMEOUT, async {
                conn.read_response(false).await.map_err(Into::into)
            })
            .await?;
            // A CONNECT's 2xx has no body: the tunnel follows.
            let tunnel_open = connect && (200..300).contains(&head.status);
            let reusable = tunnel_open || (drain(&mut conn, &head).await && head.keep_alive);
            log::debug!(
                "proxy answered {} {} (keep-alive {}, body {:?})",
                head.status,
                head.reason,
                head.keep_alive,
                head.body
            );
            if head.status != 407 {
                let (tcp, unread) = conn.into_inner();
                if !unread.is_empty() {
                    return Err(EgressError::BytesAfterConnect(self.proxy_text()).into());
                }
                return Ok((head, tcp));
            }
            let refused = |scheme: Scheme| EgressError::CredentialsRefused {
                proxy: self.proxy_text(),
                scheme: scheme.name(),
            };
            let next = match sending.take() {
                Some(Step::NtlmNegotiate(scheme)) => {
                    let challenge =
                        proxy_auth::ntlm_challenge(head.headers_all("proxy-authenticate"), scheme);
                    let (Some(challenge), Some(creds)) = (challenge, &self.credentials) else {
                        return Err(refused(scheme).into());
                    };
                    let mut client_challenge = [0u8; 8];
                    getrandom::fill(&mut client_challenge).map_err(CarrierError::Random)?;
                    let token = proxy_auth::ntlm_authenticate(
                        creds,
                        WORKSTATION,
                        &challenge,
                        client_challenge,
                        proxy_auth::ntlm_time(SystemTime::now()),
                    )
                    .map_err(EgressError::from)?;
                    Step::NtlmAuthenticate(scheme, token)
                }
                Some(Step::NtlmAuthenticate(scheme, _)) => return Err(refused(scheme).into()),
                Some(Step::Basic) => Step::first(self.learn(&head, Some(Scheme::Basic))?),
                None => Step::first(self.learn(&head, None)?),
            };
            if !reusable {
                return Err(EgressError::ClosedDuringAuth {
                    proxy: self.proxy_text(),
                    scheme: next.scheme().name(),
                }
                .into());
            }
            sending = Some(next);
        }
        Err(EgressError::CredentialsRefused {
            proxy: self.proxy_text(),
            scheme: lock(&self.scheme).name(),
        }
        .into())
    }
}

/// What the next authentication round sends: NTLM's messages go under
/// the scheme's name (NTLM or Negotiate).
enum Step {
    Basic,
    NtlmNegotiate(Scheme),
    NtlmAuthenticate(Scheme, String),
}

impl Step {
    fn first(scheme: Scheme) -> Step {
        if scheme.per_connection() {
            Step::NtlmNegotiate(scheme)
        } else {
            Step::Basic
        }
    }

    fn scheme(&self) -> Scheme {
        match self {
            Step::Basic => Scheme::Basic,
            Step::NtlmNegotiate(scheme) | Step::NtlmAuthenticate(scheme, _) => *scheme,
        }
    }
}

fn push_auth(head: &mut String, auth: Option<&str>) {
    if let Some(value) = auth {
        head.push_str("Proxy-Authorization: ");
        head.push_str(value);
        head.push_str("\r\n");
    }
}

fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// Reads and discards a proxy's page; whether the connection can go on.
async fn drain(conn: &mut HttpConn<TcpStream>, head: &ResponseHead) -> bool {
    if head.body == BodyKind::UntilClose {
        return false;
    }
    let reading = async {
        let mut body = conn.body(head.body, Some(MAX_PROXY_PAGE));
        while body.next().await?.is_some() {}
        Ok::<_, HttpError>(())
    };
    let limit = async {
        smol::Timer::after(DRAIN_LIMIT).await;
        Err(HttpError::Timeout)
    };
    futures_lite::future::or(reading, limit).await.is_ok()
}

/// Time to read a proxy's page.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl From<EgressError> for CarrierError {
    fn from(e: EgressError) -> Self {
        CarrierError::Egress(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carrier::http;

    fn egress(auth: Option<(&str, &str)>, https: bool) -> Egress {
        let station = StationUrl { https, host: "st".into(), port: 80, path_prefix: "/".into() };
        let auth = auth.map(|(u, p)| (u.to_owned(), p.to_owned()));
        let proxy = ProxyUrl { host: "px".into(), port: 3128, auth };
        Egress::new(station, Some(proxy), &AgentTls::default())
    }

    fn head(text: &str) -> ResponseHead {
        http::parse_response(text.as_bytes(), false).unwrap().unwrap().0
    }

    const OFFERS_NTLM: &str = "HTTP/1.1 407 Proxy Authentication Required\r\n\
        Proxy-Authenticate: Negotiate\r\nProxy-Authenticate: NTLM\r\n\
        Proxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n";
    const OFFERS_BASIC: &str = "HTTP/1.1 407 Proxy Authentication Required\r\n\
        Proxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n";
    const OFFERS_NEGOTIATE: &str = "HTTP/1.1 407 Proxy Authentication Required\r\n\
        Proxy-Authenticate: Negotiate\r\nContent-Length: 0\r\n\r\n";
    const OFFERS_DIGEST: &str = "HTTP/1.1 407 Proxy Authentication Required\r\n\
        Proxy-Authenticate: Digest realm=\"x\", nonce=\"n\"\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn basic_goes_unasked_until_the_proxy_offers_ntlm() {
        let e = egress(Some(("CORP\\alice", "pw")), false);
        assert!(e.absolute_form());
        assert_eq!(e.request_authorization(), Some(Credentials::new("CORP\\alice", "pw").basic()));
        let error = e.request_refused(&head(OFFERS_NTLM));
        assert!(
            matches!(
                error,
                CarrierError::Egress(EgressError::SwitchingScheme { scheme: "NTLM", .. })
            ),
            "{error}"
        );
        // The connection is authenticated now; requests carry nothing.
        assert_eq!(e.request_authorization(), None);
        assert_eq!(*lock(&e.scheme), Scheme::Ntlm);
        // A 407 on an NTLM-authenticated connection is not a new offer.
        let error = e.request_refused(&head(OFFERS_NTLM));
        assert!(
            matches!(error, CarrierError::Egress(EgressError::NotKept { scheme: "NTLM", .. })),
            "{error}"
        );
    }

    #[test]
    fn refusals_say_what_to_do_and_never_show_the_password() {
        let e = egress(Some(("alice", "s3cret")), false);
        let error = e.request_refused(&head(OFFERS_BASIC));
        assert!(
            matches!(
                error,
                CarrierError::Egress(EgressError::CredentialsRefused { scheme: "Basic", .. })
            ),
            "{error}"
        );
        assert!(!error.to_string().contains("s3cret"));
        let error = e.request_refused(&head(OFFERS_DIGEST));
        assert_eq!(
            error.to_string(),
            format!("the proxy px:3128 offers only Digest authentication; {SCHEMES}")
        );
        let anonymous = egress(None, false);
        assert!(matches!(
            anonymous.request_refused(&head(OFFERS_NTLM)),
            CarrierError::ProxyAuth(_)
        ));
    }

    #[cfg(feature = "ntlm")]
    #[test]
    fn a_proxy_offering_only_negotiate_gets_ntlm_under_that_name() {
        let e = egress(Some(("CORP\\alice", "pw")), false);
        let error = e.request_refused(&head(OFFERS_NEGOTIATE));
        assert_eq!(
            error.to_string(),
            "the proxy px:3128 asks for Negotiate authentication; the next connection uses it"
        );
        assert_eq!(*lock(&e.scheme), Scheme::Negotiate);
        assert_eq!(e.request_authorization(), None);
        assert!(matches!(Step::first(Scheme::Negotiate), Step::NtlmNegotiate(Scheme::Negotiate)));
    }

    #[test]
    fn connect_hides_requests_from_the_proxy() {
        let e = egress(Some(("alice", "pw")), true);
        assert!(!e.absolute_form());
        assert_eq!(e.request_authorization(), None);
    }
}
