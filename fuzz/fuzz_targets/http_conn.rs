//! A whole HTTP/1.1 connection as the station (requests) or the agent
//! (responses) reads it: heads, bodies of every framing, pipelined messages,
//! all through `HttpConn`'s fixed buffer, with the bytes arriving in pieces
//! the fuzzer chooses and every other read answered `Pending`.
//!
//! The transcript (heads, body bytes, the error that ended it) must be the
//! same whatever the pieces (except how much of a body over the limit is
//! handed out before it is refused), and no body may pass its limit.
#![no_main]

use futures_lite::future::block_on;
use libfuzzer_sys::fuzz_target;
use postern::carrier::conn::HttpConn;
use postern::carrier::harness::Peer;
use postern::carrier::http::{BodyKind, HttpError};

/// Body limit the harness reads with: small, so inputs can cross it.
const BODY_LIMIT: u64 = 512;

/// Input: a flags byte (bit 0: read responses, as the agent does, instead
/// of requests, as the station does), a count byte n (mod 16), n piece sizes
/// (cycled; 0 is taken as 1), then the byte stream; a plain layout so seeds
/// can be written by hand.
struct Input<'a> {
    responses: bool,
    pieces: &'a [u8],
    stream: &'a [u8],
}

fuzz_target!(|data: &[u8]| {
    let [flags, count, rest @ ..] = data else { return };
    let (pieces, stream) = rest.split_at(usize::from(count % 16).min(rest.len()));
    let input = Input { responses: flags & 1 == 1, pieces, stream };
    let whole = transcript(&input, peer(input.stream, &[]));
    let pieced = transcript(&input, peer(input.stream, input.pieces));
    assert_eq!(pieced, whole, "pieces {:?}", input.pieces);
});

fn transcript(input: &Input<'_>, peer: Peer) -> Vec<String> {
    let mut conn = HttpConn::new(peer);
    let mut log = Vec::new();
    block_on(async {
        loop {
            let body = if input.responses {
                match conn.read_response(false).await {
                    Ok(head) => {
                        log.push(format!("{head:?}"));
                        head.body
                    }
                    Err(error) => {
                        log.push(format!("head error: {error}"));
                        return;
                    }
                }
            } else {
                match conn.read_request().await {
                    Ok(Some(head)) => {
                        log.push(format!("{head:?}"));
                        head.body
                    }
                    Ok(None) => {
                        log.push("closed".into());
                        return;
                    }
                    Err(error) => {
                        log.push(format!("head error: {error}"));
                        return;
                    }
                }
            };
            let mut bytes = Vec::new();
            let read = conn.body(body, Some(BODY_LIMIT)).read_to_end(&mut bytes).await;
            assert!(bytes.len() as u64 <= BODY_LIMIT, "{} body bytes", bytes.len());
            if let BodyKind::Length(len) = body {
                if read.is_ok() {
                    assert_eq!(bytes.len() as u64, len);
                }
            }
            // Bytes before a BodyTooLarge depend on the pieces: a run that
            // crosses the limit is refused whole, and pieces make smaller runs.
            if !matches!(read, Err(HttpError::BodyTooLarge { .. })) {
                log.push(format!("body {bytes:?}"));
            }
            if let Err(error) = read {
                log.push(format!("body error: {error}"));
                return;
            }
            if body == BodyKind::UntilClose {
                return;
            }
        }
    });
    log
}

/// The stream in pieces of the given sizes (cycled; 0 is taken as 1), or
/// whole when there are none.
fn peer(stream: &[u8], sizes: &[u8]) -> Peer {
    let mut cuts = Vec::new();
    let mut at = 0;
    for size in sizes.iter().map(|&s| usize::from(s.max(1))).cycle() {
        at += size;
        if at >= stream.len() {
            break;
        }
        cuts.push(at);
    }
    Peer::split(stream, &cuts)
}
