//! Noise IK end to end between agent and station, as values, not tasks.
//!
//! ```text
//! agent                                             station
//! initiate(own key, pinned station key, session id)
//!   ── msg1 (ephemeral, agent's static key, session id) ──▶ respond(own key, msg1)
//!                                                           → device key: look it up
//!   ◀────────────────── msg2 ──────────────────────────── Responder::accept()
//! finish(msg2) → Transport                                 → Transport
//! ```
//!
//! After the handshake every packet is sealed with an explicit counter sent
//! in the clear (snow's stateless transport), because carriers lose and
//! reorder packets; each counter is used once, resends included, and the
//! receiver keeps a sliding [`ReplayWindow`] as WireGuard does.
//!
//! BLAKE2s is RustCrypto's, wrapped here; with the `ring` feature
//! ChaCha20-Poly1305 comes from ring through snow's ring resolver;
//! everything else, and everything without it, from snow's default
//! resolver (RustCrypto).

use std::sync::atomic::{AtomicU64, Ordering};

use blake2::digest::{Digest, FixedOutputReset};
use blake2::Blake2s256;
use snow::params::NoiseParams;
#[cfg(feature = "ring")]
use snow::resolvers::RingResolver;
use snow::{
    params::{CipherChoice, DHChoice, HashChoice},
    resolvers::{CryptoResolver, DefaultResolver},
    types::{Cipher, Dh, Hash, Random},
};

use crate::keys::{PrivateKey, PublicKey};

const PATTERN: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";

/// Binds handshakes to this protocol and version.
const PROLOGUE: &[u8] = b"postern/1";

/// Length of the random session id the agent picks for each session.
pub const SESSION_ID_LEN: usize = 16;

/// Bytes ahead of each sealed packet in a carrier body: ciphertext length
/// (u16, big-endian) and counter (u64, big-endian).
pub const RECORD_HEADER: usize = 2 + 8;

/// AEAD tag appended to every sealed packet.
pub const TAG: usize = 16;

/// Largest record: Noise caps a message at 65535 bytes.
pub const MAX_RECORD: usize = RECORD_HEADER + 65535;

/// Largest handshake message we accept; IK's first message with our payload
/// is 128 bytes, the second 48.
pub const MAX_HANDSHAKE: usize = 256;

/// Counters a receiver remembers behind the newest. Packets reorder only
/// between the few carrier connections of one session, so 8192 is ample.
/// Public so the fuzz target can model the window's promise exactly.
pub const REPLAY_WINDOW: u64 = 8192;

/// What went wrong in the security layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// A handshake message did not verify: wrong keys, or not Noise at all.
    #[error("handshake failed: {0}")]
    Handshake(snow::Error),
    /// The handshake payload is not a postern session id.
    #[error("handshake carries no valid session id")]
    BadPayload,
    /// A packet did not authenticate: forged, corrupted, or from another session.
    #[error("packet failed authentication")]
    Forged,
    /// A packet's counter was seen before or is too old to tell.
    #[error("replayed packet (counter {0})")]
    Replay(u64),
}

pub type SessionId = [u8; SESSION_ID_LEN];

fn params() -> NoiseParams {
    PATTERN.parse().expect("PATTERN is a valid Noise pattern")
}

/// Where snow gets its primitives. snow's default resolver would do, but
/// it instantiates every hash it knows, BLAKE2b included, which the
/// pattern never uses (about 14 KiB of an armv7 agent): BLAKE2s comes from
/// [`Blake2s`] instead. With the `ring` feature the AEAD that every byte
/// of the tunnel goes through is ring's ChaCha20-Poly1305 (assembly for
/// x86_64 and ARM): RustCrypto's `chacha20poly1305`, snow's default, took
/// about 42% of the agent's and the station's CPU in a stream transfer.
/// X25519 and the randomness stay with snow's default resolver. Either
/// way the functions are the same as snow's own; a test pins that.
struct Resolver;

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        DefaultResolver.resolve_rng()
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        DefaultResolver.resolve_dh(choice)
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        match choice {
            HashChoice::Blake2s => Some(Box::new(Blake2s::default())),
            _ => None,
        }
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        #[cfg(feature = "ring")]
        return RingResolver.resolve_cipher(choice);
        #[cfg(not(feature = "ring"))]
        return DefaultResolver.resolve_cipher(choice);
    }
}

fn builder<'a>() -> snow::Builder<'a> {
    snow::Builder::with_resolver(params(), Box::new(Resolver))
}

/// BLAKE2s-256 as Noise uses it (snow's HMAC and HKDF are built on these
/// calls); also the demo's and the tests' digest.
#[derive(Default)]
pub struct Blake2s(Blake2s256);

impl Hash for Blake2s {
    fn name(&self) -> &'static str {
        "BLAKE2s"
    }

    fn block_len(&self) -> usize {
        64
    }

    fn hash_len(&self) -> usize {
        32
    }

    fn reset(&mut self) {
        Digest::reset(&mut self.0);
    }

    fn input(&mut self, data: &[u8]) {
        Digest::update(&mut self.0, data);
    }

    fn result(&mut self, out: &mut [u8]) {
        out[..32].copy_from_slice(&self.0.finalize_fixed_reset());
    }
}

/// The agent's half-done handshake.
pub struct Initiator(snow::HandshakeState);

/// Starts a handshake; returns the state and the first message to send.
pub fn initiate(
    own: &PrivateKey,
    station: &PublicKey,
    session_id: &SessionId,
) -> Result<(Initiator, Vec<u8>), CryptoError> {
    let mut state = builder()
        .local_private_key(own.as_bytes())
        .and_then(|b| b.remote_public_key(&station.0))
        .and_then(|b| b.prologue(PROLOGUE))
        .and_then(|b| b.build_initiator())
        .map_err(CryptoError::Handshake)?;
    let mut msg = vec![0u8; MAX_HANDSHAKE];
    let n = state.write_message(session_id, &mut msg).map_err(CryptoError::Handshake)?;
    msg.truncate(n);
    Ok((Initiator(state), msg))
}

impl Initiator {
    /// Reads the station's reply; the session keys are ready.
    pub fn finish(mut self, reply: &[u8]) -> Result<Transport, CryptoError> {
        let mut payload = [0u8; MAX_HANDSHAKE];
        self.0.read_message(reply, &mut payload).map_err(CryptoError::Handshake)?;
        Transport::new(self.0)
    }
}

/// The station's view of a first handshake message that verified.
pub struct Responder {
    state: snow::HandshakeState,
    /// The device's static key, proven by the message.
    pub device: PublicKey,
    pub session_id: SessionId,
}

/// Reads an agent's first message. This is the expensive step (two
/// Diffie-Hellman operations) that unauthenticated traffic can trigger.
pub fn respond(own: &PrivateKey, msg: &[u8]) -> Result<Responder, CryptoError> {
    let mut state = builder()
        .local_private_key(own.as_bytes())
        .and_then(|b| b.prologue(PROLOGUE))
        .and_then(|b| b.build_responder())
        .map_err(CryptoError::Handshake)?;
    if msg.len() > MAX_HANDSHAKE {
        return Err(CryptoError::BadPayload);
    }
    let mut payload = [0u8; MAX_HANDSHAKE];
    let n = state.read_message(msg, &mut payload).map_err(CryptoError::Handshake)?;
    let session_id: SessionId = payload[..n].try_into().map_err(|_| CryptoError::BadPayload)?;
    let remote = state.get_remote_static().ok_or(CryptoError::BadPayload)?;
    let device = PublicKey(remote.try_into().map_err(|_| CryptoError::BadPayload)?);
    Ok(Responder { state, device, session_id })
}

impl Responder {
    /// Accepts the device: returns the reply to send and the session keys.
    pub fn accept(mut self) -> Result<(Vec<u8>, Transport), CryptoError> {
        let mut msg = vec![0u8; MAX_HANDSHAKE];
        let n = self.state.write_message(&[], &mut msg).map_err(CryptoError::Handshake)?;
        msg.truncate(n);
        Ok((msg, Transport::new(self.state)?))
    }
}

/// Session keys. Shared by every task of a session: sealing takes a fresh
/// counter atomically and opening needs no lock.
pub struct Transport {
    state: snow::StatelessTransportState,
    next_counter: AtomicU64,
}

impl Transport {
    fn new(state: snow::HandshakeState) -> Result<Self, CryptoError> {
        let state = state.into_stateless_transport_mode().map_err(CryptoError::Handshake)?;
        Ok(Transport { state, next_counter: AtomicU64::new(0) })
    }

    /// Seals `plaintext` (at most [`crate::core::frame::MAX_PACKET`] bytes) and
    /// appends the record to `out`.
    pub fn seal(&self, plaintext: &[u8], out: &mut Vec<u8>) {
        let counter = self.next_counter.fetch_add(1, Ordering::Relaxed);
        let start = out.len();
        let len = plaintext.len() + TAG;
        let len16 = u16::try_from(len).expect("packets are at most MAX_PACKET bytes");
        out.extend_from_slice(&len16.to_be_bytes());
        out.extend_from_slice(&counter.to_be_bytes());
        out.resize(start + RECORD_HEADER + len, 0);
        self.state
            .write_message(counter, plaintext, &mut out[start + RECORD_HEADER..])
            .expect("the output has room and the counter is fresh");
    }

    /// Opens one record's ciphertext into `out` (replaced). The caller checks
    /// the counter against its [`ReplayWindow`] after this succeeds.
    pub fn open(
        &self,
        counter: u64,
        ciphertext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        if ciphertext.len() < TAG {
            return Err(CryptoError::Forged);
        }
        out.resize(ciphertext.len(), 0);
        let n =
            self.state.read_message(counter, ciphertext, out).map_err(|_| CryptoError::Forged)?;
        out.truncate(n);
        Ok(())
    }
}

/// Which counters have been received, WireGuard-style: a bitmap of the last
/// [`REPLAY_WINDOW`] counters below the highest seen.
pub struct ReplayWindow {
    /// One past the highest counter accepted; 0 before any.
    top: u64,
    bits: Box<[u64; (REPLAY_WINDOW / 64) as usize]>,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow { top: 0, bits: Box::new([0; (REPLAY_WINDOW / 64) as usize]) }
    }
}

impl ReplayWindow {
    /// Records `counter`; false if it was seen before or is too old to tell.
    pub fn accept(&mut self, counter: u64) -> bool {
        // Noise reserves 2^64-1 (snow opens nothing under it), so no genuine
        // packet has it; refusing it keeps `top`, one past the highest, in a u64.
        if counter == u64::MAX {
            return false;
        }
        if counter >= self.top {
            let fresh = counter - self.top + 1;
            if fresh >= REPLAY_WINDOW {
                self.bits.fill(0);
            } else {
                for c in self.top..=counter {
                    self.set(c, false);
                }
            }
            self.top = counter + 1;
            self.set(counter, true);
            return true;
        }
        if self.top - counter > REPLAY_WINDOW || self.get(counter) {
            return false;
        }
        self.set(counter, true);
        true
    }

    fn get(&self, counter: u64) -> bool {
        let bit = counter % REPLAY_WINDOW;
        self.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    fn set(&mut self, counter: u64, on: bool) {
        let bit = counter % REPLAY_WINDOW;
        let word = &mut self.bits[(bit / 64) as usize];
        if on {
            *word |= 1 << (bit % 64);
        } else {
            *word &= !(1 << (bit % 64));
        }
    }
}

/// Splits carrier body bytes into records, whatever the chunking. Records
/// that arrive whole in one slice are passed on without a copy.
#[derive(Default)]
pub struct RecordReader {
    partial: Vec<u8>,
}

/// One whole record found at the start of a buffer: counter, ciphertext,
/// and bytes used.
type Record<'a> = (u64, &'a [u8], usize);

/// A carrier body held something that is not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("carrier body is not a sequence of sealed packets (record length {0})")]
pub struct BadRecord(usize);

impl RecordReader {
    /// Feeds body bytes; calls `each(counter, ciphertext)` for every complete record.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        mut each: impl FnMut(u64, &[u8]),
    ) -> Result<(), BadRecord> {
        while !input.is_empty() {
            if self.partial.is_empty() {
                match Self::whole(input)? {
                    Some((counter, ciphertext, used)) => {
                        each(counter, ciphertext);
                        input = &input[used..];
                        continue;
                    }
                    None => {
                        self.partial.extend_from_slice(input);
                        return Ok(());
                    }
                }
            }
            // Complete the partial record: first its header, then its body.
            let want = if self.partial.len() < RECORD_HEADER {
                RECORD_HEADER
            } else {
                RECORD_HEADER + Self::length(&self.partial)?
            };
            let take = (want - self.partial.len()).min(input.len());
            self.partial.extend_from_slice(&input[..take]);
            input = &input[take..];
            if let Some((counter, ciphertext, _)) = Self::whole(&self.partial)? {
                each(counter, ciphertext);
                self.partial.clear();
            }
        }
        Ok(())
    }

    /// True when the body ended between records, as it must.
    pub fn is_clean(&self) -> bool {
        self.partial.is_empty()
    }

    fn length(bytes: &[u8]) -> Result<usize, BadRecord> {
        let len = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
        if len < TAG {
            return Err(BadRecord(len));
        }
        Ok(len)
    }

    fn whole(bytes: &[u8]) -> Result<Option<Record<'_>>, BadRecord> {
        if bytes.len() < RECORD_HEADER {
            return Ok(None);
        }
        let len = Self::length(bytes)?;
        if bytes.len() < RECORD_HEADER + len {
            return Ok(None);
        }
        let counter = u64::from_be_bytes(bytes[2..10].try_into().expect("8 bytes"));
        Ok(Some((counter, &bytes[RECORD_HEADER..RECORD_HEADER + len], RECORD_HEADER + len)))
    }
}

/// The sealing key pair of a fresh session, for tests and the demo.
#[cfg(test)]
pub(crate) fn session_pair() -> (Transport, Transport) {
    let station_key = PrivateKey::generate();
    let agent_key = PrivateKey::generate();
    let (init, msg1) = initiate(&agent_key, &station_key.public_key(), &[7; 16]).unwrap();
    let responder = respond(&station_key, &msg1).unwrap();
    let (msg2, station) = responder.accept().unwrap();
    (init.finish(&msg2).unwrap(), station)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_identifies_the_device_and_carries_the_session_id() {
        let station_key = PrivateKey::generate();
        let agent_key = PrivateKey::generate();
        let (_, msg1) = initiate(&agent_key, &station_key.public_key(), &[9; 16]).unwrap();
        let responder = respond(&station_key, &msg1).unwrap();
        assert_eq!(responder.device, agent_key.public_key());
        assert_eq!(responder.session_id, [9; 16]);
    }

    #[test]
    fn a_handshake_for_another_station_fails() {
        let agent_key = PrivateKey::generate();
        let other = PrivateKey::generate();
        let (_, msg1) = initiate(&agent_key, &other.public_key(), &[1; 16]).unwrap();
        assert!(matches!(respond(&PrivateKey::generate(), &msg1), Err(CryptoError::Handshake(_))));
    }

    #[test]
    fn sealed_packets_open_once_and_flipped_bits_fail() {
        let (agent, station) = session_pair();
        let mut records = Vec::new();
        agent.seal(b"first", &mut records);
        agent.seal(b"second", &mut records);
        let mut window = ReplayWindow::default();
        let mut opened = Vec::new();
        let mut plain = Vec::new();
        RecordReader::default()
            .feed(&records, |counter, ct| {
                station.open(counter, ct, &mut plain).unwrap();
                assert!(window.accept(counter));
                assert!(!window.accept(counter), "a counter is accepted once");
                opened.push(plain.clone());
            })
            .unwrap();
        assert_eq!(opened, vec![b"first".to_vec(), b"second".to_vec()]);
        for i in 0..records.len() {
            let mut tampered = records.clone();
            tampered[i] ^= 0x40;
            let mut ok = 0;
            let _ = RecordReader::default().feed(&tampered, |counter, ct| {
                if station.open(counter, ct, &mut plain).is_ok() {
                    ok += 1;
                }
            });
            assert!(ok < 2, "flipping byte {i} must break a record");
        }
    }

    #[test]
    fn our_resolver_and_snows_default_interoperate() {
        // The agent uses snow's default resolver (its BLAKE2s, RustCrypto's
        // AEAD), the station ours (our BLAKE2s; ring's AEAD with `ring`):
        // the handshake completes and each opens what the other sealed, so
        // builds on either side of the change keep talking.
        let station_key = PrivateKey::generate();
        let agent_key = PrivateKey::generate();
        let station_public = station_key.public_key();
        let mut agent = snow::Builder::new(params())
            .local_private_key(agent_key.as_bytes())
            .and_then(|b| b.remote_public_key(&station_public.0))
            .and_then(|b| b.prologue(PROLOGUE))
            .and_then(|b| b.build_initiator())
            .unwrap();
        let mut msg = [0u8; MAX_HANDSHAKE];
        let n = agent.write_message(&[5; SESSION_ID_LEN], &mut msg).unwrap();
        let (msg2, station) = respond(&station_key, &msg[..n]).unwrap().accept().unwrap();
        agent.read_message(&msg2, &mut [0u8; MAX_HANDSHAKE]).unwrap();
        let agent = Transport::new(agent).unwrap();
        for len in [0, 1, 63, 64, 65, 1000, crate::core::frame::MAX_PACKET] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            for (from, to) in [(&agent, &station), (&station, &agent)] {
                let mut record = Vec::new();
                from.seal(&plain, &mut record);
                let mut opened = Vec::new();
                RecordReader::default()
                    .feed(&record, |counter, ct| to.open(counter, ct, &mut opened).unwrap())
                    .unwrap();
                assert_eq!(opened, plain, "{len} bytes");
            }
        }
    }

    #[test]
    fn replay_window_slides() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(5));
        assert!(w.accept(3), "reordered but new");
        assert!(!w.accept(3));
        assert!(w.accept(5 + REPLAY_WINDOW));
        assert!(!w.accept(5), "fell out of the window");
        assert!(w.accept(6 + REPLAY_WINDOW / 2));
        assert!(w.accept(u64::MAX - 1));
        assert!(!w.accept(6 + REPLAY_WINDOW / 2));
    }

    /// Found by the replay_window fuzz target: `u64::MAX` overflowed `top`
    /// (a panic with overflow checks, an endless loop without).
    #[test]
    fn the_reserved_counter_is_refused() {
        let mut fresh = ReplayWindow::default();
        assert!(!fresh.accept(u64::MAX));
        assert!(fresh.accept(0), "the refusal recorded nothing");
        let mut w = ReplayWindow::default();
        assert!(w.accept(u64::MAX - 1));
        assert!(!w.accept(u64::MAX));
        assert!(!w.accept(u64::MAX - 1));
        assert!(w.accept(u64::MAX - 2));
    }

    #[test]
    fn records_survive_any_split() {
        let (agent, _) = session_pair();
        let mut records = Vec::new();
        for len in [0usize, 1, 100, 70_000 / 2] {
            agent.seal(&vec![3u8; len], &mut records);
        }
        let whole = collect(&[&records]);
        for cut in (0..records.len()).step_by(997) {
            let (a, b) = records.split_at(cut);
            assert_eq!(collect(&[a, b]), whole, "split at {cut}");
        }
        let bytewise: Vec<&[u8]> = records.chunks(1).collect();
        assert_eq!(collect(&bytewise), whole);
    }

    fn collect(pieces: &[&[u8]]) -> Vec<(u64, Vec<u8>)> {
        let mut reader = RecordReader::default();
        let mut out = Vec::new();
        for piece in pieces {
            reader.feed(piece, |c, ct| out.push((c, ct.to_vec()))).unwrap();
        }
        assert!(reader.is_clean());
        out
    }

    #[test]
    fn a_record_shorter_than_a_tag_is_rejected() {
        let mut reader = RecordReader::default();
        assert_eq!(
            reader.feed(&[0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3], |_, _| {}),
            Err(BadRecord(3))
        );
    }
}
