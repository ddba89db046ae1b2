//! Chunked bodies, cut into pieces the way a network delivers them.
//!
//! The decoder promises that any split of the input gives the same payload
//! and outcome as the whole input, that each call makes progress, and that
//! an error is sticky; a body it accepts, re-encoded by our own chunk
//! writer, decodes to the same payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::carrier::http::{write_chunk_header, ChunkedDecoder, Decoded, CHUNK_END, LAST_CHUNK};

#[derive(Debug, PartialEq)]
enum Outcome {
    /// The body ended after this many input bytes.
    End(usize),
    Error(String),
    Incomplete,
}

// Input: a count byte n (taken mod 16), n little-endian u16 cut offsets
// (taken modulo the body's length), then the body; a plain layout so seeds
// can be written by hand.
fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else { return };
    let split = (usize::from(count % 16) * 2).min(rest.len());
    let (cut_bytes, body) = rest.split_at(split);
    let mut cuts: Vec<usize> = cut_bytes
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (body.len() + 1))
        .collect();
    cuts.sort_unstable();
    let whole = decode(body, &[]);
    let pieces = decode(body, &cuts);
    assert_eq!(pieces, whole, "split at {cuts:?}");

    if let (payload, Outcome::End(_)) = whole {
        let mut encoded = Vec::new();
        for run in payload.chunks(1000) {
            write_chunk_header(&mut encoded, run.len());
            encoded.extend_from_slice(run);
            encoded.extend_from_slice(CHUNK_END);
        }
        encoded.extend_from_slice(LAST_CHUNK);
        assert_eq!(decode(&encoded, &[]), (payload, Outcome::End(encoded.len())));
    }
});

/// Feeds `input` to a fresh decoder in pieces ending at `cuts`; each piece is
/// offered until used up, as a connection's buffer is.
fn decode(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Outcome) {
    let mut decoder = ChunkedDecoder::new();
    let mut payload = Vec::new();
    let mut offset = 0;
    for &piece_end in cuts.iter().chain([&input.len()]) {
        loop {
            let window = &input[offset..piece_end.max(offset)];
            match decoder.decode(window) {
                Ok(Decoded::Data { consumed, start, len }) => {
                    assert!(len > 0 && start + len == consumed && consumed <= window.len());
                    payload.extend_from_slice(&window[start..consumed]);
                    offset += consumed;
                }
                Ok(Decoded::NeedMore { consumed }) => {
                    assert_eq!(consumed, window.len());
                    offset += consumed;
                    break;
                }
                Ok(Decoded::End { consumed }) => {
                    assert!(consumed <= window.len());
                    offset += consumed;
                    assert!(matches!(
                        decoder.decode(b"5\r\nmore\r\n"),
                        Ok(Decoded::End { consumed: 0 })
                    ));
                    return (payload, Outcome::End(offset));
                }
                Err(error) => {
                    let again = decoder.decode(b"0\r\n\r\n");
                    assert_eq!(format!("{again:?}"), format!("{:?}", Err::<(), _>(&error)));
                    return (payload, Outcome::Error(format!("{error:?}")));
                }
            }
        }
    }
    (payload, Outcome::Incomplete)
}
