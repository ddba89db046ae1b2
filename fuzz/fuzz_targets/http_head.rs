//! Request and response heads as they arrive from anyone on the internet
//! (station) or from whatever proxy sits on the path (agent), and the
//! carrier path inside a request target.
//!
//! Beyond "no panic": a head's parse does not depend on the bytes after it,
//! every shorter prefix of a complete head asks for more bytes (so a
//! connection never acts on half a head), the bounds hold, and what our
//! encoders write from a parsed head parses back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::carrier::http::{
    parse_request, parse_response, write_request_head, write_response_head, BodyKind, HttpError,
    MAX_HEADERS, MAX_HEAD_BYTES,
};
use postern::carrier::{parse_path, path};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else { return };
    if mode & 1 == 0 {
        request(input);
    } else {
        response(input, mode & 2 != 0);
    }
});

/// What every head parser promises of `input`: incomplete only below the
/// bound, errors that map to 400 or 431, and a head within the bounds that
/// parses the same alone and is incomplete when cut by a byte. Returns the
/// head and its length, if there is one.
fn checked_parse<H: Clone + PartialEq + std::fmt::Debug>(
    input: &[u8],
    parse: impl Fn(&[u8]) -> Result<Option<(H, usize)>, HttpError>,
    fields: impl Fn(&H) -> usize,
) -> Option<(H, usize)> {
    let (head, len) = match parse(input) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            assert!(input.len() < MAX_HEAD_BYTES, "incomplete at or past the bound");
            return None;
        }
        Err(error) => {
            check_error(&error);
            return None;
        }
    };
    assert!(len <= input.len() && len <= MAX_HEAD_BYTES);
    assert!(fields(&head) <= MAX_HEADERS);
    let again = parse(&input[..len]).expect("the same head parses alone").unwrap();
    assert_eq!(again, (head.clone(), len));
    assert!(matches!(parse(&input[..len - 1]), Ok(None)), "a cut head is incomplete");
    Some((head, len))
}

fn request(input: &[u8]) {
    let Some((head, len)) = checked_parse(input, parse_request, |h| h.headers.len()) else {
        return;
    };

    if let Some((session, verb)) = parse_path(&head.target) {
        assert_eq!(parse_path(&path("/x/", &session, verb)), Some((session, verb)));
    }

    // Re-encoding: our encoder writes the framing itself.
    if len > MAX_HEAD_BYTES - ENCODER_SLACK {
        return;
    }
    let extra = passable_fields(&head.headers, &["host"]);
    let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (*n, *v)).collect();
    let host = head.header("host").and_then(|h| std::str::from_utf8(h).ok()).unwrap_or("h");
    let mut out = Vec::new();
    write_request_head(&mut out, &head.method, &head.target, host, &extra, head.body);
    let (back, back_len) = parse_request(&out).expect("our own head parses").unwrap();
    assert_eq!(back_len, out.len());
    assert_eq!((&back.method, &back.target), (&head.method, &head.target));
    let expected = match head.body {
        BodyKind::Empty if matches!(head.method.as_str(), "POST" | "PUT") => BodyKind::Length(0),
        body => body,
    };
    assert_eq!(back.body, expected);
}

fn response(input: &[u8], head_request: bool) {
    let parse = |bytes: &[u8]| parse_response(bytes, head_request);
    let Some((head, len)) = checked_parse(input, parse, |h| h.headers.len()) else {
        return;
    };
    if head_request || head.status == 204 || head.status == 304 || (100..200).contains(&head.status)
    {
        assert_eq!(head.body, BodyKind::Empty, "{} has no body", head.status);
    }
    if head.body == BodyKind::UntilClose {
        assert!(!head.keep_alive, "a body ended by the close cannot keep the connection");
    }

    // httparse takes any three digits; our encoder writes only real statuses.
    if !(100..1000).contains(&head.status) || len > MAX_HEAD_BYTES - ENCODER_SLACK {
        return;
    }
    let extra = passable_fields(&head.headers, &[]);
    let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (*n, *v)).collect();
    let mut out = Vec::new();
    write_response_head(&mut out, head.status, &head.reason, &extra, head.body, head.keep_alive);
    let (back, back_len) = parse_response(&out, head_request).expect("ours parse").unwrap();
    assert_eq!(back_len, out.len());
    assert_eq!(back.status, head.status);
    assert_eq!(back.keep_alive, head.keep_alive && head.body != BodyKind::UntilClose);
}

/// Header fields an encoder may be handed: framing fields (and `skip`)
/// removed, values that are text, and few enough that the fields the
/// encoder adds (`Host`, framing, `Connection`) keep the count legal.
fn passable_fields<'h>(headers: &'h [(String, Vec<u8>)], skip: &[&str]) -> Vec<(&'h str, &'h str)> {
    const FRAMING: [&str; 3] = ["content-length", "transfer-encoding", "connection"];
    headers
        .iter()
        .filter(|(name, _)| !FRAMING.iter().chain(skip).any(|f| name.eq_ignore_ascii_case(f)))
        .filter_map(|(name, value)| Some((name.as_str(), std::str::from_utf8(value).ok()?)))
        .take(MAX_HEADERS - 3)
        .collect()
}

/// Bytes the encoder may add to a head (`Host`, framing, `Connection`
/// fields); a head this close to the bound is not re-encoded.
const ENCODER_SLACK: usize = 128;

fn check_error(error: &HttpError) {
    assert!(matches!(error.status(), 400 | 431));
    let _ = error.to_string();
}
