//! The HTTP/1.1 carrier: how sealed packets ride in requests and responses.
//!
//! Every carrier request is `POST {prefix}p1/{session id}/{verb}`, where the
//! prefix is whatever path the agent's `station` URL has (a reverse proxy
//! may mount the station anywhere; the station matches on the tail), and the
//! session id in the path lets a load balancer hash or stick on it.
//!
//! | verb    | request body              | response body                          | shape  |
//! |---------|---------------------------|----------------------------------------|--------|
//! | `hello` | Noise message 1           | Noise message 2                        | both   |
//! | `down`  | sealed ack (proves owner) | chunked, sealed packets, long-lived    | stream |
//! | `up`    | chunked sealed packets    | empty, when the body ends              | stream |
//! | `poll`  | sealed ack                | sealed packets, held up to [`poll::POLL_WAIT`] | poll |
//! | `push`  | sealed packets            | sealed packets the station has now, else a sealed ack | poll |
//! | `rekey` | [`rekey_body`]: Noise message 1 and a sealed ack (current keys) | Noise message 2 | both |
//!
//! The poll shape pipelines: an agent keeps several pushes, and while data
//! comes several polls, in flight, each on its own connection (see
//! [`poll::poll_continues`]); the session below reorders what they carry.
//! A push's answer carries packets too (credit for the agent's uploads
//! comes back a round trip sooner than on the next poll); an agent whose
//! push failed asks for a resend with its next poll.
//!
//! Bodies are sequences of records (see [`crate::crypto::RecordReader`]),
//! independent of chunk boundaries, so a proxy may rechunk freely.

pub mod auto;
pub mod conn;
#[cfg(any(test, feature = "fuzzing"))]
pub mod harness;
pub mod http;
pub mod link;
pub mod poll;
pub mod stream;
#[cfg(feature = "tls")]
pub mod tls;

use std::time::Duration;

use crate::crypto::SessionId;

/// Largest body of a message that carries only acks (a `down` request):
/// a few sealed ones.
pub const ACK_BODY_MAX: u64 = 4096;

/// Protocol marker in every carrier path; a new wire format gets a new one.
const PATH_MARKER: &str = "p1";

/// A header field on every reply of the station, error pages included, so
/// the agent can tell the station's 410 ("no such session") from a proxy's
/// or load balancer's page. Proxies pass unknown fields through.
pub const STATION_MARK: (&str, &str) = ("X-Postern", "station");

/// Query parameter of a hello request: the agent's keepalive interval in
/// seconds, which the station then uses for the session too, so a metered
/// link pays for the interval its owner chose in both directions.
const KEEPALIVE_PARAM: &str = "k";

/// Keepalive intervals a station follows, in seconds: from 1 s (tests
/// compress time) to an hour (metered links).
pub const KEEPALIVE_RANGE: std::ops::RangeInclusive<u64> = 1..=3600;

/// The query of a hello request stating the agent's `keepalive`.
pub fn hello_query(keepalive: Duration) -> String {
    format!("{KEEPALIVE_PARAM}={}", keepalive.as_secs().max(1))
}

/// The keepalive interval a hello request with target `target` states, if
/// it states one within [`KEEPALIVE_RANGE`].
pub fn hello_keepalive(target: &str) -> Option<Duration> {
    query_secs(target, KEEPALIVE_PARAM)
        .filter(|secs| KEEPALIVE_RANGE.contains(secs))
        .map(Duration::from_secs)
}

/// The whole seconds query parameter `name` of `target` gives, if any.
pub(super) fn query_secs(target: &str, name: &str) -> Option<u64> {
    target
        .split_once('?')
        .map(|(_, query)| query)
        .into_iter()
        .flat_map(|query| query.split('&'))
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        .and_then(|secs| secs.parse::<u64>().ok())
}

/// What a carrier request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Hello,
    Down,
    Up,
    Poll,
    Push,
    /// New keys for a running session (a key rotation), proven by a record
    /// sealed with its current ones.
    Rekey,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Hello => "hello",
            Verb::Down => "down",
            Verb::Up => "up",
            Verb::Poll => "poll",
            Verb::Push => "push",
            Verb::Rekey => "rekey",
        }
    }

    fn parse(text: &str) -> Option<Verb> {
        [Verb::Hello, Verb::Down, Verb::Up, Verb::Poll, Verb::Push, Verb::Rekey]
            .into_iter()
            .find(|v| v.as_str() == text)
    }
}

/// The body of a `rekey` request: the Noise message's length (2 bytes,
/// big-endian), the message, then the caller appends sealed records.
pub fn rekey_body(handshake: &[u8]) -> Vec<u8> {
    let len = u16::try_from(handshake.len()).expect("a Noise message is under 64 KiB");
    let mut body = Vec::with_capacity(2 + handshake.len() + 128);
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(handshake);
    body
}

/// Splits a `rekey` body into the Noise message and the sealed records.
pub fn split_rekey_body(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = body.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// The path of a carrier request under `prefix` (which starts and ends with '/').
pub fn path(prefix: &str, session: &SessionId, verb: Verb) -> String {
    format!("{prefix}{PATH_MARKER}/{}/{}", hex(session), verb.as_str())
}

/// Finds session and verb in a request target, whatever prefix precedes
/// them and whether the target is in origin or absolute form.
pub fn parse_path(target: &str) -> Option<(SessionId, Verb)> {
    let path = target.split(['?', '#']).next()?;
    let mut segments = path.rsplit('/');
    let verb = Verb::parse(segments.next()?)?;
    let session = unhex(segments.next()?)?.try_into().ok()?;
    (segments.next()? == PATH_MARKER).then_some((session, verb))
}

/// Short form of a session id for logs.
pub fn short(session: &SessionId) -> String {
    hex(&session[..4])
}

/// Lower-case hex, for session ids in paths, logs and the cluster registry.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes `text` spells in hex, two digits each, either case; `None`
/// for anything else. Checked digit by digit: `from_str_radix` alone would
/// take `+f` for 0x0f, a second spelling of a session's path.
pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SESSION_ID_LEN;

    #[test]
    fn hex_is_pairs_of_digits_only() {
        assert_eq!(unhex(""), Some(vec![]));
        assert_eq!(unhex("00ff7A"), Some(vec![0x00, 0xff, 0x7a]));
        for bad in ["0", "abc", "g0", " 0", "+f", "-0", "é"] {
            assert_eq!(unhex(bad), None, "{bad:?}");
        }
        let sid = [0x0f; SESSION_ID_LEN];
        let p = path("/", &sid, Verb::Push);
        assert_eq!(parse_path(&p), Some((sid, Verb::Push)));
        assert_eq!(parse_path(&p.replace("0f0f", "+f0f")), None, "a second spelling");
    }

    #[test]
    fn paths_round_trip_under_any_prefix() {
        let sid = [0xab; SESSION_ID_LEN];
        for prefix in ["/", "/tunnel/", "/a/b/c/"] {
            let p = path(prefix, &sid, Verb::Poll);
            assert_eq!(parse_path(&p), Some((sid, Verb::Poll)));
            assert_eq!(parse_path(&format!("http://station:8080{p}")), Some((sid, Verb::Poll)));
            assert_eq!(parse_path(&format!("{p}?x=1")), Some((sid, Verb::Poll)));
        }
    }

    #[test]
    fn rekey_bodies_split_where_they_were_joined() {
        let mut body = rekey_body(b"noise");
        body.extend_from_slice(b"records");
        assert_eq!(split_rekey_body(&body), Some((&b"noise"[..], &b"records"[..])));
        assert_eq!(split_rekey_body(&rekey_body(b"")), Some((&b""[..], &b""[..])));
        // A length past the end, or no length at all, is no body.
        assert_eq!(split_rekey_body(&[0, 9, 1, 2]), None);
        assert_eq!(split_rekey_body(&[0]), None);
        let sid = [7; SESSION_ID_LEN];
        assert_eq!(parse_path(&path("/", &sid, Verb::Rekey)), Some((sid, Verb::Rekey)));
    }

    #[test]
    fn keepalive_is_stated_in_the_hello_and_bounded() {
        let query = hello_query(Duration::from_secs(300));
        assert_eq!(
            hello_keepalive(&format!("/p1/x/hello?{query}")),
            Some(Duration::from_secs(300))
        );
        assert_eq!(hello_keepalive("/p1/x/hello"), None);
        assert_eq!(hello_keepalive("/p1/x/hello?k=0"), None);
        assert_eq!(hello_keepalive("/p1/x/hello?k=3601"), None);
        assert_eq!(hello_keepalive("/p1/x/hello?k=x"), None);
    }

    #[test]
    fn other_paths_are_not_carrier_requests() {
        for target in [
            "/",
            "/index.html",
            "/p1/zz/hello",
            "/p1/abababababababababababababababab/nope",
            "/p2/abababababababababababababababab/hello",
            "/abababababababababababababababab/hello",
            "/p1/ababababababababababababababab\u{e9}b/up",
        ] {
            assert_eq!(parse_path(target), None, "{target}");
        }
    }
}
