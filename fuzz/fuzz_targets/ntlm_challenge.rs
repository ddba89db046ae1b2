//! A proxy's NTLM challenge, as the agent answers it.
//!
//! Whatever the proxy sends in `Proxy-Authenticate: NTLM <challenge>`, the
//! agent's answer is an error or an authenticate message whose fields all
//! lie inside it; picking a scheme from offers never panics.
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use postern::agent::proxy_auth::{choose, ntlm_authenticate, ntlm_challenge, Credentials, Scheme};

fuzz_target!(|data: &[u8]| {
    let _ = choose(data.split(|&b| b == b'\n'));
    let _ = ntlm_challenge(data.split(|&b| b == b'\n'), Scheme::Negotiate);
    let creds = Credentials::new("CORP\\alice", "password");
    if let Ok(token) = ntlm_authenticate(&creds, "FUZZ", data, [7; 8], 1) {
        let msg = base64::engine::general_purpose::STANDARD.decode(token).expect("base64");
        assert!(msg.starts_with(b"NTLMSSP\0") && msg.len() >= 64);
        for field in (12..60).step_by(8) {
            let len = usize::from(u16::from_le_bytes([msg[field], msg[field + 1]]));
            let offset = u32::from_le_bytes(msg[field + 4..field + 8].try_into().unwrap()) as usize;
            assert!(offset + len <= msg.len(), "field at {field} outside the message");
        }
    }
});
