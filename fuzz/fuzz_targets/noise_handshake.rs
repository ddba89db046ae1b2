//! The Noise IK handshake from both ends: the station reading a first
//! message from anyone (`crypto::respond`, the one expensive step an
//! unauthenticated client can trigger) and the agent reading the reply
//! (`Initiator::finish`) from whatever answers on the path.
//!
//! Raw bytes only reach the first Diffie-Hellman, so the harness also builds
//! genuine messages with snow (fixed ephemeral keys, so runs repeat) around
//! a fuzzed payload and prologue, and flips a byte in them. What must hold:
//! a message verifies only if nothing in it was changed and it was made for
//! this station; it then names the sender's key and carries the session id;
//! the keys both ends derive seal and open each other's packets.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use postern::crypto::{self, CryptoError, Transport, RECORD_HEADER};
use postern::keys::PrivateKey;

const PATTERN: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE: &[u8] = b"postern/1";

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    /// Anything posted to `hello`.
    RawFirst(&'a [u8]),
    /// A genuine first message around a fuzzed payload.
    First(Genuine<'a>),
    /// Anything in the body of the reply to `hello`.
    RawReply(&'a [u8]),
    /// A genuine reply from a station the agent does (or does not) pin.
    Reply(Genuine<'a>),
}

#[derive(Arbitrary, Debug)]
struct Genuine<'a> {
    ephemeral: [u8; 32],
    /// Made for another station's key (first message) or by another
    /// station (reply).
    wrong_station: bool,
    /// Made with another protocol's prologue.
    wrong_prologue: bool,
    /// One byte flipped: position (modulo the length) and mask (never 0).
    flip: Option<(u16, u8)>,
    payload: &'a [u8],
}

fn station_key() -> PrivateKey {
    PrivateKey::from_base64("AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=").unwrap()
}

fn agent_key() -> PrivateKey {
    PrivateKey::from_base64("AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=").unwrap()
}

fn other_key() -> PrivateKey {
    PrivateKey::from_base64("AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=").unwrap()
}

fuzz_target!(|input: Input<'_>| match input {
    Input::RawFirst(msg) => {
        let _ = crypto::respond(&station_key(), msg).map(|r| r.accept());
    }
    Input::First(genuine) => first(&genuine),
    Input::RawReply(msg) => {
        let (init, _) = crypto::initiate(&agent_key(), &station_key().public_key(), &[5; 16])
            .expect("initiating cannot fail");
        assert!(init.finish(msg).is_err(), "a reply not made by the station verified");
    }
    Input::Reply(genuine) => reply(&genuine),
});

fn first(genuine: &Genuine<'_>) {
    let station = station_key();
    let agent = agent_key();
    let target = if genuine.wrong_station { other_key() } else { station_key() }.public_key();
    let prologue: &[u8] = if genuine.wrong_prologue { b"postern/0" } else { PROLOGUE };
    let mut initiator = snow::Builder::new(PATTERN.parse().unwrap())
        .local_private_key(agent.as_bytes())
        .and_then(|b| b.remote_public_key(&target.0))
        .and_then(|b| b.prologue(prologue))
        .map(|b| b.fixed_ephemeral_key_for_testing_only(&genuine.ephemeral))
        .and_then(|b| b.build_initiator())
        .unwrap();
    let mut msg = vec![0u8; 65535];
    let Ok(len) = initiator.write_message(genuine.payload, &mut msg) else { return };
    msg.truncate(len);
    let changed = flip(&mut msg, genuine.flip);

    let result = crypto::respond(&station, &msg);
    let honest = !changed && !genuine.wrong_station && !genuine.wrong_prologue;
    let responder = match result {
        Ok(responder) => responder,
        Err(CryptoError::Handshake(_)) if !honest => return,
        // An honest message is refused only for what it carries.
        Err(CryptoError::BadPayload) if genuine.payload.len() != 16 || msg.len() > 256 => return,
        Err(error) => panic!("honest={honest}, {} byte payload: {error}", genuine.payload.len()),
    };
    assert!(honest, "a changed or misdirected first message verified");
    assert_eq!(responder.device, agent_key().public_key());
    assert_eq!(&responder.session_id[..], genuine.payload);
    let (reply, station_transport) = responder.accept().expect("accepting cannot fail");
    let mut payload = [0u8; 256];
    initiator.read_message(&reply, &mut payload).expect("the station's reply verifies");
    let agent_transport = initiator.into_stateless_transport_mode().unwrap();
    // The station seals, the agent (plain snow, record format by hand) opens.
    let mut record = Vec::new();
    station_transport.seal(b"ping", &mut record);
    let counter = u64::from_be_bytes(record[2..RECORD_HEADER].try_into().unwrap());
    let mut plain = [0u8; 64];
    let n = agent_transport.read_message(counter, &record[RECORD_HEADER..], &mut plain).unwrap();
    assert_eq!(&plain[..n], b"ping");
}

fn reply(genuine: &Genuine<'_>) {
    let (init, msg1) = crypto::initiate(&agent_key(), &station_key().public_key(), &[5; 16])
        .expect("initiating cannot fail");
    // The station the reply comes from (with its own key, right or wrong).
    let station = if genuine.wrong_station { other_key() } else { station_key() };
    let prologue: &[u8] = if genuine.wrong_prologue { b"postern/0" } else { PROLOGUE };
    let mut responder = snow::Builder::new(PATTERN.parse().unwrap())
        .local_private_key(station.as_bytes())
        .and_then(|b| b.prologue(prologue))
        .map(|b| b.fixed_ephemeral_key_for_testing_only(&genuine.ephemeral))
        .and_then(|b| b.build_responder())
        .unwrap();
    let mut payload = vec![0u8; 65535];
    if responder.read_message(&msg1, &mut payload).is_err() {
        // Another station cannot even read a first message not made for it.
        assert!(genuine.wrong_station || genuine.wrong_prologue);
        return;
    }
    let mut msg = vec![0u8; 65535];
    let Ok(len) = responder.write_message(genuine.payload, &mut msg) else { return };
    msg.truncate(len);
    let changed = flip(&mut msg, genuine.flip);
    let honest = !changed && !genuine.wrong_station && !genuine.wrong_prologue;
    match init.finish(&msg) {
        Ok(agent_transport) => {
            assert!(honest, "a changed or foreign reply verified");
            let station_transport = responder.into_stateless_transport_mode().unwrap();
            seal_and_open(&agent_transport, &station_transport);
        }
        // The agent reads the payload into a buffer of MAX_HANDSHAKE bytes.
        Err(_) if !honest || genuine.payload.len() > 200 => {}
        Err(error) => panic!("an honest reply failed: {error}"),
    }
}

fn seal_and_open(agent: &Transport, station: &snow::StatelessTransportState) {
    let mut record = Vec::new();
    agent.seal(b"pong", &mut record);
    let counter = u64::from_be_bytes(record[2..RECORD_HEADER].try_into().unwrap());
    let mut plain = [0u8; 64];
    let n = station.read_message(counter, &record[RECORD_HEADER..], &mut plain).unwrap();
    assert_eq!(&plain[..n], b"pong");
}

/// Flips one byte of `msg` if asked; whether anything changed.
fn flip(msg: &mut [u8], flip: Option<(u16, u8)>) -> bool {
    match flip {
        Some((at, mask)) if !msg.is_empty() => {
            msg[usize::from(at) % msg.len()] ^= mask.max(1);
            true
        }
        _ => false,
    }
}
