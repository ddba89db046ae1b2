//! Proxy authentication schemes: which one to use, chosen from the proxy's
//! `Proxy-Authenticate` offers, and the header values each sends. No I/O
//! and no clock: the NTLM client challenge and time are parameters.
//!
//! ```text
//!  Basic:  every request (or CONNECT) carries  Proxy-Authorization: Basic base64(user:pass)
//!  NTLM:   → NTLM <negotiate>   ← 407 NTLM <challenge>   → NTLM <authenticate>   ← 2xx
//!          on one connection, which stays authenticated (the proxy remembers it)
//!  Negotiate: the same three NTLM messages under the name Negotiate
//! ```
//!
//! NTLM is NTLMv2 (MS-NLMP 3.3.2) only: the NTLMv1 and LM responses are
//! broken and turned off on current Windows domains. A user given as
//! `DOMAIN\user` names the domain.
//!
//! Kerberos is not here: every client of it links a GSSAPI library or a
//! large Kerberos stack. A proxy that offers only Negotiate gets NTLM's
//! messages as its tokens, as a Windows client without a Kerberos ticket
//! sends them: Windows servers (SSPI's Negotiate package) and squid's
//! `negotiate_wrapper_auth` take a raw NTLMSSP token; a proxy whose
//! Negotiate is Kerberos alone refuses it, and the agent says so. Basic,
//! when offered beside Negotiate, is preferred to it: such a Negotiate is
//! often Kerberos alone, and Basic then works.
//!
//! Not here: the requests that carry these headers (`egress`).

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
#[cfg(feature = "ntlm")]
use hmac::{Hmac, Mac};
#[cfg(feature = "ntlm")]
use md4::{Digest, Md4};

/// The schemes this agent speaks, preferred first: a proxy offering NTLM
/// and Basic gets NTLM, which does not send the password; Negotiate (NTLM
/// inside) only when nothing else is offered (see the module's comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Ntlm,
    Basic,
    Negotiate,
}

impl Scheme {
    /// Its name in `Proxy-Authenticate` and `Proxy-Authorization`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Ntlm => "NTLM",
            Scheme::Basic => "Basic",
            Scheme::Negotiate => "Negotiate",
        }
    }

    /// Whether the scheme authenticates the connection (by NTLM's
    /// handshake) rather than each request.
    #[must_use]
    pub fn per_connection(self) -> bool {
        self != Scheme::Basic
    }
}

/// The user, domain and password for the proxy. `{:?}` shows no password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub domain: String,
    pub user: String,
    password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({:?}\\{:?}, password hidden)", self.domain, self.user)
    }
}

impl Credentials {
    /// From the proxy URL's user and password; `DOMAIN\user` names the
    /// domain for NTLM (and stays whole for Basic).
    #[must_use]
    pub fn new(user: &str, password: &str) -> Credentials {
        let (domain, user) = user.split_once('\\').unwrap_or(("", user));
        Credentials {
            domain: domain.to_owned(),
            user: user.to_owned(),
            password: password.to_owned(),
        }
    }

    /// `Basic base64(user:password)` (RFC 7617), the domain kept in the user.
    #[must_use]
    pub fn basic(&self) -> String {
        let user = if self.domain.is_empty() {
            self.user.clone()
        } else {
            format!("{}\\{}", self.domain, self.user)
        };
        format!("Basic {}", STANDARD.encode(format!("{user}:{}", self.password)))
    }
}

/// The best scheme among a 407's `Proxy-Authenticate` values, if any is ours.
pub fn choose<'a>(offers: impl Iterator<Item = &'a [u8]>) -> Option<Scheme> {
    offers
        .flat_map(|value| value.split(|&b| b == b','))
        .filter_map(|offer| {
            let name = offer.trim_ascii().split(|&b| b == b' ').next()?;
            // A build without NTLM answers a proxy that offers both with Basic.
            [Scheme::Ntlm, Scheme::Basic, Scheme::Negotiate].into_iter().find(|scheme| {
                name.eq_ignore_ascii_case(scheme.name().as_bytes())
                    && (*scheme == Scheme::Basic || cfg!(feature = "ntlm"))
            })
        })
        .min_by_key(|scheme| *scheme as u8)
}

/// Whether the offers name `scheme_name` at all (to say what a proxy wants
/// that we do not speak).
pub fn offers_text<'a>(offers: impl Iterator<Item = &'a [u8]>) -> String {
    let names: Vec<String> = offers
        .flat_map(|value| value.split(|&b| b == b','))
        .filter_map(|offer| offer.trim_ascii().split(|&b| b == b' ').next())
        .filter(|name| !name.is_empty() && !name.contains(&b'='))
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect();
    if names.is_empty() {
        "no scheme".to_owned()
    } else {
        names.join(", ")
    }
}

/// The server's NTLM challenge message in a 407's `Proxy-Authenticate:
/// NTLM <base64>` (or `Negotiate <base64>`, as `scheme` says), decoded.
pub fn ntlm_challenge<'a>(
    offers: impl Iterator<Item = &'a [u8]>,
    scheme: Scheme,
) -> Option<Vec<u8>> {
    offers.filter_map(|value| std::str::from_utf8(value).ok()).find_map(|value| {
        let (name, token) = value.trim().split_once(' ')?;
        if !name.eq_ignore_ascii_case(scheme.name()) {
            return None;
        }
        STANDARD.decode(token.trim()).ok()
    })
}

/// Why an NTLM challenge could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NtlmError {
    #[error("the proxy's NTLM challenge is malformed ({0})")]
    BadChallenge(&'static str),
    #[error("this build of postern has no NTLM (cargo feature `ntlm`)")]
    NotBuilt,
}

const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";

/// NEGOTIATE_UNICODE | OEM | REQUEST_TARGET | NTLM | ALWAYS_SIGN |
/// EXTENDED_SESSIONSECURITY | 128 | 56: what every current client asks.
const NEGOTIATE_FLAGS: u32 = 0xa008_8207;

#[cfg(feature = "ntlm")]
/// NTLMSSP_NEGOTIATE_UNICODE: strings are UTF-16LE.
const FLAG_UNICODE: u32 = 0x1;

#[cfg(feature = "ntlm")]
/// NTLM_NEGOTIATE_OEM: strings are in the OEM code page (ASCII here).
const FLAG_OEM: u32 = 0x2;

#[cfg(feature = "ntlm")]
/// NTLMSSP_NEGOTIATE_TARGET_INFO: the challenge carries target info.
const FLAG_TARGET_INFO: u32 = 0x0080_0000;

/// MS-NLMP 2.2.2.1 AV_PAIR ids we read.
#[cfg(feature = "ntlm")]
const AV_EOL: u16 = 0;
#[cfg(feature = "ntlm")]
const AV_TIMESTAMP: u16 = 7;

#[cfg(feature = "ntlm")]
/// Longest target info we copy into the response: MS-NLMP sets no bound;
/// real ones are a few hundred bytes.
const MAX_TARGET_INFO: usize = 4096;

/// NTLM's negotiate message (MS-NLMP 2.2.1.1) in base64, without domain
/// or workstation: the proxy learns them from the authenticate message.
#[must_use]
pub fn ntlm_negotiate() -> String {
    let mut msg = Vec::with_capacity(32);
    msg.extend_from_slice(SIGNATURE);
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&NEGOTIATE_FLAGS.to_le_bytes());
    msg.extend_from_slice(&[0; 16]); // empty domain and workstation fields
    STANDARD.encode(msg)
}

#[cfg(feature = "ntlm")]
/// What a challenge message (MS-NLMP 2.2.1.2) gives the response.
#[derive(Debug, PartialEq, Eq)]
struct Challenge<'a> {
    flags: u32,
    server_challenge: [u8; 8],
    target_info: &'a [u8],
}

#[cfg(feature = "ntlm")]
fn parse_challenge(msg: &[u8]) -> Result<Challenge<'_>, NtlmError> {
    let bad = NtlmError::BadChallenge;
    if msg.len() < 32 || &msg[..8] != SIGNATURE {
        return Err(bad("no NTLMSSP signature"));
    }
    if u32_at(msg, 8) != Some(2) {
        return Err(bad("not a challenge message"));
    }
    let flags = u32_at(msg, 20).ok_or(bad("short"))?;
    let mut server_challenge = [0; 8];
    server_challenge.copy_from_slice(&msg[24..32]);
    // The target info field (offset 40) is absent in old, short messages,
    // and meaningless without NEGOTIATE_TARGET_INFO.
    let target_info = if msg.len() >= 48 && flags & FLAG_TARGET_INFO != 0 {
        let len = usize::from(u16_at(msg, 40).ok_or(bad("short"))?);
        if len == 0 {
            return Ok(Challenge { flags, server_challenge, target_info: &[] });
        }
        let offset = u32_at(msg, 44).ok_or(bad("short"))? as usize;
        let field = offset.checked_add(len).and_then(|end| msg.get(offset..end));
        field.ok_or(bad("target info outside the message"))?
    } else {
        &[]
    };
    if target_info.len() > MAX_TARGET_INFO {
        return Err(bad("target info too long"));
    }
    Ok(Challenge { flags, server_challenge, target_info })
}

#[cfg(feature = "ntlm")]
/// The server's timestamp among the AV pairs, if it sent one.
fn av_timestamp(mut pairs: &[u8]) -> Option<u64> {
    while pairs.len() >= 4 {
        let id = u16_at(pairs, 0)?;
        let len = usize::from(u16_at(pairs, 2)?);
        let value = pairs.get(4..4 + len)?;
        match id {
            AV_EOL => return None,
            AV_TIMESTAMP if len == 8 => return Some(u64::from_le_bytes(value.try_into().ok()?)),
            _ => pairs = &pairs[4 + len..],
        }
    }
    None
}

#[cfg(feature = "ntlm")]
fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

#[cfg(feature = "ntlm")]
fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(feature = "ntlm")]
fn utf16le(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

#[cfg(feature = "ntlm")]
fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let mut mac = <Hmac<md5::Md5> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(feature = "ntlm")]
/// NTOWFv2 (MS-NLMP 3.3.2): HMAC-MD5 keyed with MD4(UTF-16LE(password))
/// over UTF-16LE(UPPER(user) + domain).
fn ntowf_v2(creds: &Credentials) -> [u8; 16] {
    let nt_hash: [u8; 16] = Md4::digest(utf16le(&creds.password)).into();
    let identity = utf16le(&format!("{}{}", creds.user.to_uppercase(), creds.domain));
    hmac_md5(&nt_hash, &[&identity])
}

#[cfg(feature = "ntlm")]
/// NTLM's authenticate message (MS-NLMP 2.2.1.3) in base64, answering `challenge`,
/// with NTLMv2 and LMv2 responses. `client_challenge` is 8 random bytes;
/// `now` is the time in 100 ns ticks since 1601 (used when the server sent
/// no timestamp of its own).
pub fn ntlm_authenticate(
    creds: &Credentials,
    workstation: &str,
    challenge: &[u8],
    client_challenge: [u8; 8],
    now: u64,
) -> Result<String, NtlmError> {
    let challenge = parse_challenge(challenge)?;
    let timestamp = av_timestamp(challenge.target_info).unwrap_or(now);
    let key = ntowf_v2(creds);

    let mut blob = Vec::with_capacity(32 + challenge.target_info.len());
    blob.extend_from_slice(&[1, 1, 0, 0, 0, 0, 0, 0]);
    blob.extend_from_slice(&timestamp.to_le_bytes());
    blob.extend_from_slice(&client_challenge);
    blob.extend_from_slice(&[0; 4]);
    blob.extend_from_slice(challenge.target_info);
    blob.extend_from_slice(&[0; 4]);
    let proof = hmac_md5(&key, &[&challenge.server_challenge, &blob]);
    let mut nt_response = proof.to_vec();
    nt_response.extend_from_slice(&blob);
    let mut lm_response =
        hmac_md5(&key, &[&challenge.server_challenge, &client_challenge]).to_vec();
    lm_response.extend_from_slice(&client_challenge);

    let text = |s: &str| {
        if challenge.flags & FLAG_UNICODE != 0 {
            utf16le(s)
        } else {
            s.as_bytes().to_vec()
        }
    };
    let fields: [Vec<u8>; 6] = [
        lm_response,
        nt_response,
        text(&creds.domain),
        text(&creds.user),
        text(workstation),
        Vec::new(), // no session key: we neither sign nor seal
    ];
    const HEADER: usize = 64;
    let mut msg = Vec::with_capacity(HEADER + fields.iter().map(Vec::len).sum::<usize>());
    msg.extend_from_slice(SIGNATURE);
    msg.extend_from_slice(&3u32.to_le_bytes());
    let mut offset = HEADER;
    for field in &fields {
        let len = u16::try_from(field.len()).map_err(|_| NtlmError::BadChallenge("too long"))?;
        msg.extend_from_slice(&len.to_le_bytes());
        msg.extend_from_slice(&len.to_le_bytes());
        msg.extend_from_slice(&(offset as u32).to_le_bytes());
        offset += field.len();
    }
    // One encoding, the one used: some servers read OEM when both are set.
    let flags = if challenge.flags & FLAG_UNICODE != 0 {
        NEGOTIATE_FLAGS & !FLAG_OEM
    } else {
        NEGOTIATE_FLAGS & !FLAG_UNICODE
    };
    msg.extend_from_slice(&flags.to_le_bytes());
    for field in &fields {
        msg.extend_from_slice(field);
    }
    Ok(STANDARD.encode(msg))
}

/// Without the `ntlm` feature [`choose`] never picks NTLM, so this is not
/// reached; it says what is missing if it were.
#[cfg(not(feature = "ntlm"))]
pub fn ntlm_authenticate(
    _creds: &Credentials,
    _workstation: &str,
    _challenge: &[u8],
    _client_challenge: [u8; 8],
    _now: u64,
) -> Result<String, NtlmError> {
    Err(NtlmError::NotBuilt)
}

/// Now in NTLM's time: 100 ns ticks since 1601-01-01.
#[must_use]
pub fn ntlm_time(now: std::time::SystemTime) -> u64 {
    const UNIX_EPOCH_TICKS: u64 = 116_444_736_000_000_000;
    let since_unix = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    UNIX_EPOCH_TICKS + since_unix.as_nanos() as u64 / 100
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        let text: String = text.split_whitespace().collect();
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// MS-NLMP 4.2.1 and 4.2.4: the specification's own NTLMv2 example.
    fn spec_credentials() -> Credentials {
        Credentials::new("Domain\\User", "Password")
    }

    /// The challenge of MS-NLMP 4.2.4.3, with its target info (4.2.4.1.3:
    /// NetBIOS domain "Domain", NetBIOS computer "Server").
    fn spec_challenge() -> Vec<u8> {
        let target_info = hex("02 00 0c 00 44 00 6f 00 6d 00 61 00 69 00 6e 00
             01 00 0c 00 53 00 65 00 72 00 76 00 65 00 72 00 00 00 00 00");
        let mut msg = SIGNATURE.to_vec();
        msg.extend_from_slice(&2u32.to_le_bytes());
        msg.extend_from_slice(&[12, 0, 12, 0, 56, 0, 0, 0]); // target name "Domain"
        msg.extend_from_slice(&0xe28a_8233_u32.to_le_bytes());
        msg.extend_from_slice(&hex("01 23 45 67 89 ab cd ef"));
        msg.extend_from_slice(&[0; 8]);
        let info_at = 56 + 12;
        msg.extend_from_slice(&(target_info.len() as u16).to_le_bytes());
        msg.extend_from_slice(&(target_info.len() as u16).to_le_bytes());
        msg.extend_from_slice(&(info_at as u32).to_le_bytes());
        msg.extend_from_slice(&[0; 8]); // version
        msg.extend_from_slice(&utf16le("Domain"));
        msg.extend_from_slice(&target_info);
        msg
    }

    #[test]
    fn ntowf_v2_matches_the_specification() {
        // MS-NLMP 4.2.4.1.1.
        assert_eq!(ntowf_v2(&spec_credentials()).to_vec(), hex("0c868a403bfd7a93a3001ef22ef02e3f"));
    }

    #[test]
    fn ntlmv2_responses_match_the_specification() {
        let header =
            ntlm_authenticate(&spec_credentials(), "COMPUTER", &spec_challenge(), [0xaa; 8], 0)
                .unwrap();
        let msg = STANDARD.decode(header).unwrap();
        let field = |at: usize| {
            let len = usize::from(u16_at(&msg, at).unwrap());
            let offset = u32_at(&msg, at + 4).unwrap() as usize;
            msg[offset..offset + len].to_vec()
        };
        // 4.2.4.2.1 LMv2 response, 4.2.4.2.2 NTProofStr (the first 16 bytes).
        assert_eq!(field(12), hex("86c35097ac9cec102554764a57cccc19 aaaaaaaaaaaaaaaa"));
        assert_eq!(field(20)[..16], hex("68cd0ab851e51c96aabc927bebef6a1c")[..]);
        assert_eq!(field(28), utf16le("Domain"));
        assert_eq!(field(36), utf16le("User"));
        assert_eq!(field(44), utf16le("COMPUTER"));
    }

    #[test]
    fn offers_pick_ntlm_then_basic_then_negotiate_and_ignore_the_rest() {
        let offers: [&[u8]; 3] = [b"Negotiate", b"Basic realm=\"x\"", b"NTLM"];
        assert_eq!(choose(offers.into_iter()), Some(Scheme::Ntlm));
        assert_eq!(choose([&b"Basic realm=\"a, b\""[..]].into_iter()), Some(Scheme::Basic));
        let kerberos_or_basic: [&[u8]; 2] = [b"Negotiate", b"Basic realm=x"];
        assert_eq!(choose(kerberos_or_basic.into_iter()), Some(Scheme::Basic));
        let negotiate_only: [&[u8]; 2] = [b"negotiate", b"Digest realm=x"];
        let expected = cfg!(feature = "ntlm").then_some(Scheme::Negotiate);
        assert_eq!(choose(negotiate_only.into_iter()), expected);
        assert_eq!(choose([&b"Digest realm=x"[..]].into_iter()), None);
        assert_eq!(offers_text(negotiate_only.into_iter()), "negotiate, Digest");
        let token = STANDARD.encode(b"abc");
        let (ntlm, negotiate) = (format!("NTLM {token}"), format!("Negotiate {token}"));
        let offers = [&b"Basic realm=x"[..], ntlm.as_bytes()];
        assert_eq!(ntlm_challenge(offers.into_iter(), Scheme::Ntlm), Some(b"abc".to_vec()));
        assert_eq!(ntlm_challenge(offers.into_iter(), Scheme::Negotiate), None);
        let offers = [negotiate.as_bytes()];
        assert_eq!(ntlm_challenge(offers.into_iter(), Scheme::Negotiate), Some(b"abc".to_vec()));
        assert_eq!(ntlm_challenge([&b"NTLM"[..]].into_iter(), Scheme::Ntlm), None);
    }

    #[test]
    fn malformed_challenges_are_errors_not_panics() {
        let good = spec_challenge();
        let creds = spec_credentials();
        for cut in 0..good.len() {
            // Any prefix either parses (the target info is optional) or is refused.
            let _ = ntlm_authenticate(&creds, "w", &good[..cut], [1; 8], 0);
        }
        let mut far = good.clone();
        far[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            ntlm_authenticate(&creds, "w", &far, [1; 8], 0),
            Err(NtlmError::BadChallenge("target info outside the message"))
        );
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2000 {
            let mut bytes = good.clone();
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let at = (rng % bytes.len() as u64) as usize;
            bytes[at] = (rng >> 32) as u8;
            let _ = ntlm_authenticate(&creds, "w", &bytes, [1; 8], 0);
        }
    }

    #[test]
    fn credentials_never_show_the_password() {
        let creds = Credentials::new("CORP\\alice", "s3cret");
        assert_eq!((creds.domain.as_str(), creds.user.as_str()), ("CORP", "alice"));
        assert!(!format!("{creds:?}").contains("s3cret"));
        assert_eq!(Credentials::new("u", "p").basic(), "Basic dTpw");
        assert_eq!(ntlm_time(std::time::UNIX_EPOCH), 116_444_736_000_000_000);
    }
}
