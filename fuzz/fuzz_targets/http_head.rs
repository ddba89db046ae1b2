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

fn request(input: &[u8]) {
    let (head, len) = match parse_request(input) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            assert!(input.len() < MAX_HEAD_BYTES, "incomplete at or past the bound");
            return;
        }
        Err(error) => return check_error(&error),
    };
    assert!(len <= input.len() && len <= MAX_HEAD_BYTES);
    assert!(head.headers.len() <= MAX_HEADERS);
    let again = parse_request(&input[..len]).expect("the same head parses alone").unwrap();
    assert_eq!(again, (head.clone(), len));
    assert!(matches!(parse_request(&input[..len - 1]), Ok(None)), "a cut head is incomplete");

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
    let (head, len) = match parse_response(input, head_request) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            assert!(input.len() < MAX_HEAD_BYTES, "incomplete at or past the bound");
            return;
        }
        Err(error) => return check_error(&error),
    };
    assert!(len <= input.len() && len <= MAX_HEAD_BYTES);
    assert!(head.headers.len() <= MAX_HEADERS);
    let again = parse_response(&input[..len], head_request).expect("parses alone").unwrap();
    assert_eq!(again, (head.clone(), len));
    assert!(matches!(parse_response(&input[..len - 1], head_request), Ok(None)));
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
