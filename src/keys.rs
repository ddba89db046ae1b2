//! X25519 static keys: the identity of a station and of each device.
//!
//! Keys travel in configuration files and on the command line as standard
//! base64 with padding (44 characters), the same text form WireGuard uses, so
//! operators can handle them with tools they already know.
//!
//! ```text
//!  PrivateKey::generate()  --public_key()-->  PublicKey
//!        |  to_base64 / from_base64               |  to_base64 / from_base64 / fingerprint
//!   private_key = "..."                       public_key = "..."
//! ```
//!
//! The public key is derived through snow's own Curve25519 implementation, so
//! the key a device prints with `postern pubkey` is exactly the static key the
//! station will see in the Noise handshake. This module does no Noise itself
//! and no file I/O; `config` reads key files, `crypto` runs the handshake.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use snow::params::DHChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver};

/// Length in bytes of an X25519 private or public key (RFC 7748).
pub const KEY_LEN: usize = 32;

/// Characters of base64 shown by [`PublicKey::fingerprint`]: 72 bits, enough
/// to tell a fleet's devices apart in a log line, short enough to read.
const FINGERPRINT_LEN: usize = 12;

/// Why a key's text form was rejected. The caller adds where the text came
/// from (file and field); this says only what is wrong with the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The text is not standard base64 (A-Z a-z 0-9 + / with `=` padding).
    #[error("not valid base64")]
    Base64,
    /// The text is base64 but decodes to the wrong number of bytes.
    #[error("decodes to {got} bytes, a key is 32")]
    Length {
        /// How many bytes the text decoded to.
        got: usize,
    },
}

/// An X25519 private key. Its `Debug` form never shows the bytes, so a key
/// cannot leak into a log line through `{:?}` of a config struct.
#[derive(Clone)]
pub struct PrivateKey([u8; KEY_LEN]);

/// An X25519 public key: how the station knows a device, and how the agent
/// pins the station.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PrivateKey {
    /// A new random key from the operating system's generator.
    ///
    /// Clamping is left to X25519 itself (snow clamps on every use), so any
    /// 32 random bytes are a valid key.
    ///
    /// # Panics
    ///
    /// If the operating system cannot provide randomness. A key made without
    /// it would be guessable, and there is nothing better to fall back to.
    #[must_use]
    pub fn generate() -> PrivateKey {
        let mut bytes = [0u8; KEY_LEN];
        getrandom::fill(&mut bytes)
            .expect("the operating system's random number generator must work to make a key");
        PrivateKey(bytes)
    }

    /// Parse the base64 text form; surrounding whitespace (a trailing newline
    /// from a key file or a pipe) is ignored.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode_key(text).map(PrivateKey)
    }

    /// The base64 text form, as written to key files and `private_key`.
    #[must_use]
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The raw key, for handing to snow's builder.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The matching public key, computed by the same X25519 code the Noise
    /// handshake uses.
    #[must_use]
    pub fn public_key(&self) -> PublicKey {
        let mut dh = DefaultResolver
            .resolve_dh(&DHChoice::Curve25519)
            .expect("snow is built with use-curve25519, so its default resolver has Curve25519");
        dh.set(&self.0);
        let mut public = [0u8; KEY_LEN];
        public.copy_from_slice(dh.pubkey());
        PublicKey(public)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

impl PublicKey {
    /// Parse the base64 text form; surrounding whitespace is ignored.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode_key(text).map(PublicKey)
    }

    /// The base64 text form, as printed by `postern pubkey`.
    #[must_use]
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// A short prefix of the base64 form for log lines: enough to find the
    /// device in a config file, short enough not to swamp the line.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        let mut text = self.to_base64();
        text.truncate(FINGERPRINT_LEN);
        text
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

fn decode_key(text: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let bytes = STANDARD.decode(text.trim()).map_err(|_| KeyError::Base64)?;
    <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length { got: bytes.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> [u8; KEY_LEN] {
        let mut out = [0u8; KEY_LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("test vector is hex");
        }
        out
    }

    #[test]
    fn public_key_matches_rfc7748_vector() {
        // RFC 7748 section 6.1, Alice's key pair.
        let private =
            PrivateKey(hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"));
        let expected = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(private.public_key(), PublicKey(expected));
    }

    #[test]
    fn derived_public_key_is_what_noise_peer_sees() {
        let params: snow::params::NoiseParams =
            "Noise_IK_25519_ChaChaPoly_BLAKE2s".parse().expect("pattern name is valid");
        let device = PrivateKey::generate();
        let station = PrivateKey::generate();
        let station_public = station.public_key();

        let mut initiator = snow::Builder::new(params.clone())
            .local_private_key(device.as_bytes())
            .and_then(|b| b.remote_public_key(&station_public.0))
            .and_then(|b| b.build_initiator())
            .expect("initiator builds");
        let mut responder = snow::Builder::new(params)
            .local_private_key(station.as_bytes())
            .and_then(|b| b.build_responder())
            .expect("responder builds");

        let mut message = [0u8; 256];
        let mut payload = [0u8; 256];
        let len = initiator.write_message(b"", &mut message).expect("first message");
        responder
            .read_message(&message[..len], &mut payload)
            .expect("station accepts first message");
        let len = responder.write_message(b"", &mut message).expect("second message");
        initiator
            .read_message(&message[..len], &mut payload)
            .expect("device accepts second message, so station key matched");

        assert!(initiator.is_handshake_finished());
        assert!(responder.is_handshake_finished());
        assert_eq!(responder.get_remote_static(), Some(&device.public_key().0[..]));
    }

    #[test]
    fn base64_round_trip() {
        let private = PrivateKey::generate();
        let text = private.to_base64();
        assert_eq!(text.len(), 44);
        assert!(text.ends_with('='));
        let again = PrivateKey::from_base64(&format!("  {text}\n")).expect("round trip");
        assert_eq!(again.as_bytes(), private.as_bytes());

        let public = private.public_key();
        assert_eq!(PublicKey::from_base64(&public.to_base64()).expect("round trip"), public);
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(PrivateKey::generate().as_bytes(), PrivateKey::generate().as_bytes());
    }

    #[test]
    fn rejects_bad_base64() {
        assert_eq!(PrivateKey::from_base64("not base64!").unwrap_err(), KeyError::Base64);
        assert_eq!(PublicKey::from_base64("").unwrap_err(), KeyError::Length { got: 0 });
        // URL-safe alphabet is a different encoding; WireGuard keys use standard.
        assert_eq!(
            PublicKey::from_base64("-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-=").unwrap_err(),
            KeyError::Base64
        );
    }

    #[test]
    fn rejects_wrong_length() {
        let short = STANDARD.encode([7u8; 31]);
        let err = PublicKey::from_base64(&short).unwrap_err();
        assert_eq!(err, KeyError::Length { got: 31 });
        assert_eq!(err.to_string(), "decodes to 31 bytes, a key is 32");
        assert_eq!(KeyError::Base64.to_string(), "not valid base64");
    }

    #[test]
    fn debug_hides_private_bytes() {
        let private = PrivateKey::from_base64(&STANDARD.encode([0xAB; 32])).expect("valid");
        assert_eq!(format!("{private:?}"), "PrivateKey(..)");
        let public = PublicKey([0; 32]);
        assert_eq!(
            format!("{public:?}"),
            "PublicKey(AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=)"
        );
    }

    #[test]
    fn fingerprint_is_base64_prefix() {
        let public = PrivateKey::generate().public_key();
        let fingerprint = public.fingerprint();
        assert_eq!(fingerprint.len(), 12);
        assert!(public.to_base64().starts_with(&fingerprint));
    }
}
