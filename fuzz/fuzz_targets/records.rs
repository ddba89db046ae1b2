//! Carrier bodies after the handshake, as `Tunnel::receive` reads them:
//! records split out of body bytes cut anywhere, opened with the session's
//! keys, checked against the replay window.
//!
//! The body is built from genuine sealed packets, replays of them, flipped
//! bytes and garbage, so the fuzzer reaches the AEAD and the window and not
//! only the framing. What must hold: a packet is opened only if it is one
//! the peer sealed, with the counter it was sealed under, and never twice;
//! a body of untouched records delivers every packet once, in order.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use postern::crypto::{self, RecordReader, ReplayWindow, Transport, RECORD_HEADER};
use postern::keys::PrivateKey;

#[derive(Arbitrary, Debug)]
enum Part<'a> {
    /// A packet freshly sealed by the peer.
    Sealed(&'a [u8]),
    /// A record sent before, sent again.
    Replay(u8),
    /// A record sent before, with one byte flipped (the mask is never 0).
    Flipped { record: u8, at: u16, mask: u8 },
    /// Bytes that were never a record.
    Garbage(&'a [u8]),
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    parts: Vec<Part<'a>>,
    /// Where the body is cut into the pieces the reader is fed.
    cuts: Vec<u16>,
}

/// Both ends of one session; the handshake is done once per process.
fn pair() -> &'static (Transport, Transport) {
    static PAIR: OnceLock<(Transport, Transport)> = OnceLock::new();
    PAIR.get_or_init(|| {
        let station = PrivateKey::generate();
        let agent = PrivateKey::generate();
        let (init, msg1) = crypto::initiate(&agent, &station.public_key(), &[7; 16]).unwrap();
        let (msg2, station_side) = crypto::respond(&station, &msg1).unwrap().accept().unwrap();
        (init.finish(&msg2).unwrap(), station_side)
    })
}

fuzz_target!(|input: Input<'_>| {
    let (agent, station) = pair();
    let mut body = Vec::new();
    let mut records: Vec<Vec<u8>> = Vec::new();
    // Plaintext each sealed counter stands for, and the order sent.
    let mut sealed = HashMap::new();
    let mut order = Vec::new();
    let mut untouched = true;
    for part in &input.parts {
        match *part {
            Part::Sealed(plaintext) => {
                let mut record = Vec::new();
                agent.seal(plaintext, &mut record);
                let counter = u64::from_be_bytes(record[2..RECORD_HEADER].try_into().unwrap());
                sealed.insert(counter, plaintext.to_vec());
                order.push(counter);
                body.extend_from_slice(&record);
                records.push(record);
            }
            Part::Replay(index) => {
                if let Some(record) = pick(&records, index) {
                    body.extend_from_slice(&record.clone());
                }
            }
            Part::Flipped { record, at, mask } => {
                if let Some(record) = pick(&records, record) {
                    let mut record = record.clone();
                    let at = usize::from(at) % record.len();
                    record[at] ^= mask.max(1);
                    body.extend_from_slice(&record);
                    untouched = false;
                }
            }
            Part::Garbage(bytes) => {
                body.extend_from_slice(bytes);
                untouched &= bytes.is_empty();
            }
        }
    }

    let mut cuts: Vec<usize> =
        input.cuts.iter().map(|&c| usize::from(c) % (body.len() + 1)).collect();
    cuts.sort_unstable();
    let mut reader = RecordReader::default();
    let mut window = ReplayWindow::default();
    let mut opened = Vec::new();
    let mut seen = HashSet::new();
    let mut plain = Vec::new();
    let mut from = 0;
    let mut framing_ok = true;
    for &to in cuts.iter().chain([&body.len()]) {
        let fed = reader.feed(&body[from..to], |counter, ciphertext| {
            if station.open(counter, ciphertext, &mut plain).is_err() || !window.accept(counter) {
                return;
            }
            assert_eq!(sealed.get(&counter), Some(&plain), "counter {counter} opened to a forgery");
            assert!(seen.insert(counter), "counter {counter} opened twice");
            opened.push(counter);
        });
        from = to;
        if fed.is_err() {
            // The carrier drops the body here, as Tunnel's callers do.
            framing_ok = false;
            break;
        }
    }
    if untouched {
        assert!(framing_ok && reader.is_clean());
        assert_eq!(opened, order, "every sealed packet once, in order");
    }
});

fn pick(records: &[Vec<u8>], index: u8) -> Option<&Vec<u8>> {
    if records.is_empty() {
        return None;
    }
    records.get(usize::from(index) % records.len())
}
