//! Chunked bodies, cut into pieces the way a network delivers them.
//!
//! The decoder promises that any split of the input gives the same payload
//! and outcome as the whole input, that each call makes progress, and that
//! an error is sticky; a body it accepts, re-encoded by our own chunk
//! writer, decodes to the same payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::carrier::harness::{decode_in_pieces as decode, Outcome};
use postern::carrier::http::{write_chunk_header, CHUNK_END, LAST_CHUNK};

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
